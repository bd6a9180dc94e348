//! The moto EC2 API server, started on loopback by the tests, with a VPC 127.0.0.0/16 and a
//! subnet 127.0.1.0/24: every instance launched into it gets a 127.0.1.x address, so nothing
//! a test registers (HAProxy health-checks it, the master SSHes to it) leaves the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{free_port, wait_for_tcp, Proc};

/// moto_server from $MOTO_SERVER or the repository's .venv-moto (scripts/install-deps.sh).
pub fn moto_bin() -> Option<PathBuf> {
    let p = std::env::var_os("MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-moto/bin/moto_server")
        });
    if p.is_file() {
        return Some(p);
    }
    super::unavailable(
        &format!(
            "moto_server not found at {}; this test needs the real EC2 API server",
            p.display()
        ),
        "run scripts/install-deps.sh (it makes .venv-moto) or set MOTO_SERVER",
    );
    None
}

/// A moto server on loopback with a loopback VPC and subnet; stopped on drop.
pub struct Moto {
    _proc: Proc,
    pub endpoint: String,
    pub subnet: String,
}

impl Moto {
    pub async fn start(bin: &Path) -> Moto {
        let port = free_port("127.0.0.1");
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let proc = Proc(child);
        wait_for_tcp(&format!("127.0.0.1:{port}"), "moto_server");
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = client(&endpoint).await;
        let vpc = client
            .create_vpc()
            .cidr_block("127.0.0.0/16")
            .send()
            .await
            .unwrap();
        let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_string();
        let subnet = client
            .create_subnet()
            .vpc_id(vpc_id)
            .cidr_block("127.0.1.0/24")
            .send()
            .await
            .unwrap();
        Moto {
            _proc: proc,
            endpoint,
            subnet: subnet.subnet().unwrap().subnet_id().unwrap().to_string(),
        }
    }
}

/// A plain SDK client of `endpoint`, for a test's own look at EC2.
pub async fn client(endpoint: &str) -> aws_sdk_ec2::Client {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "testing", "testing", None, None, "test",
        ))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&sdk)
}

/// cloud-init's console block announcing `pub_key` (a `.pub` file's text).
pub fn console_with_key(pub_key: &str) -> String {
    format!(
        "[   11.2] cloud-init[601]: Generating public/private ed25519 key pair.\n\
         -----BEGIN SSH HOST KEY KEYS-----\n{}\n-----END SSH HOST KEY KEYS-----\n\
         [   12.0] cloud-init[601]: Cloud-init finished\n",
        pub_key.trim()
    )
}

/// `[aws]` and `[launch]` settings that launch into moto through `endpoint` (moto itself or
/// a proxy in front of it), in its loopback `subnet`, instances tagged with `group`.
pub fn ec2_settings(endpoint: &str, subnet: &str, group: &str) -> Vec<super::Setting> {
    vec![
        ("aws", "endpoint", endpoint.to_string()),
        ("aws", "region", "us-east-1".into()),
        ("aws", "access_key_id", "testing".into()),
        ("aws", "secret_access_key", "testing".into()),
        ("aws", "api_timeout", "2s".into()),
        ("launch", "image_id", "ami-12c6146b".into()),
        ("launch", "subnet_id", subnet.to_string()),
        ("launch", "group", group.to_string()),
    ]
}

/// The ids of the instances EC2 (moto, asked directly) has pending or running.
pub async fn live_instances(ec2: &autoscaler_actors::adapters::ec2::SdkEc2) -> Vec<String> {
    use autoscaler_actors::adapters::ec2::Ec2Api;
    ec2.describe(None)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.is_live())
        .map(|i| i.instance_id)
        .collect()
}
