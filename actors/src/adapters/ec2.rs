//! The EC2 calls autoscaler makes, behind one small trait, and their implementation with the
//! official AWS SDK for Rust (aws-config + aws-sdk-ec2).
//!
//! Every call attempt is bounded by `[aws] api_timeout`. Throttling, 5xx answers, timeouts and
//! broken connections are retried by the SDK's standard strategy (jittered exponential
//! backoff, [`MAX_ATTEMPTS`] attempts) — except RunInstances, which comes back at once with
//! [`Ec2Error::retryable`] set: the call may have reached EC2 before its answer was lost, so
//! the launcher looks for the decision's instances before asking again. Anything else comes
//! back once with the API's own message.

use std::future::Future;
use std::pin::Pin;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::config::{Config, Credentials, Region};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    Filter, IamInstanceProfileSpecification, InstanceStateName, InstanceType,
    LaunchTemplateSpecification, ResourceType, Tag, TagSpecification,
};
use thiserror::Error;

use crate::config::{Aws, Launch};

/// Attempts per API call for throttling and server errors.
pub const MAX_ATTEMPTS: u32 = 5;
/// Tag naming the group an instance belongs to.
pub const GROUP_TAG: &str = "autoscaler:group";
/// Tag naming the decision that launched an instance.
pub const DECISION_TAG: &str = "autoscaler:decision";

/// An API failure, with the service's message.
#[derive(Debug, Clone, Error)]
#[error("EC2 {operation}: {message}")]
pub struct Ec2Error {
    pub operation: &'static str,
    pub message: String,
    /// Throttling, a server error, a timeout or a lost connection: asking again may work.
    pub retryable: bool,
    /// The API says the instance does not exist (any more).
    pub not_found: bool,
}

impl Ec2Error {
    /// EC2 refused a RunInstances because its ClientToken was used before with other
    /// parameters: the decision's instances exist, launched with other settings (a master
    /// with another configuration made the first call).
    pub fn token_reused(&self) -> bool {
        self.message.contains("IdempotentParameterMismatch")
    }
}

/// One instance as autoscaler cares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance_id: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, …
    pub state: String,
    pub private_ip: Option<String>,
    /// Value of the decision tag.
    pub decision: Option<String>,
}

impl InstanceInfo {
    /// Running or about to be.
    pub fn is_live(&self) -> bool {
        matches!(self.state.as_str(), "pending" | "running")
    }
}

type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, Ec2Error>> + Send + 'a>>;

/// The EC2 operations the launcher needs.
pub trait Ec2Api: Send + Sync {
    /// RunInstances of `count` with the launch settings, ClientToken `decision` and the
    /// group and decision tags.
    fn run_instances<'a>(&'a self, count: u32, decision: &'a str) -> Fut<'a, Vec<InstanceInfo>>;
    /// Instances of this group (optionally of one decision), any state.
    fn describe<'a>(&'a self, decision: Option<&'a str>) -> Fut<'a, Vec<InstanceInfo>>;
    /// TerminateInstances.
    fn terminate<'a>(&'a self, instance_id: &'a str) -> Fut<'a, ()>;
    /// GetConsoleOutput, decoded (empty while the instance has printed nothing yet).
    fn console_output<'a>(&'a self, instance_id: &'a str) -> Fut<'a, String>;
}

/// [`Ec2Api`] with the AWS SDK.
pub struct SdkEc2 {
    client: aws_sdk_ec2::Client,
    launch: Launch,
    user_data: Option<UserData>,
}

/// The user-data file, and the secret its launches' keys derive from.
struct UserData {
    text: Vec<u8>,
    secret: Option<Vec<u8>>,
}

impl UserData {
    /// The user data of one launch, base64: [`REPORT_SECRET_PLACEHOLDER`] replaced by the key
    /// of that launch ([`crate::report::launch_key`]), never by the fleet's secret.
    fn for_launch(&self, decision: &str) -> Result<String, String> {
        let key = self
            .secret
            .as_deref()
            .map(|s| crate::report::launch_key(s, decision));
        let bytes = with_secret(self.text.clone(), key.as_deref().map(str::as_bytes))?;
        use base64::Engine;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    }
}

impl SdkEc2 {
    /// Builds a client from `[aws]` (region, endpoint, profile, static keys or the standard
    /// chain) and keeps `[launch]` for RunInstances. Reads the user-data file now; each
    /// launch gets it with [`REPORT_SECRET_PLACEHOLDER`] replaced by that launch's key,
    /// derived from `report_secret`.
    pub async fn new(
        aws: &Aws,
        launch: &Launch,
        report_secret: Option<&[u8]>,
    ) -> Result<SdkEc2, Ec2Error> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS))
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(aws.api_timeout)
                    .build(),
            );
        if !aws.region.is_empty() {
            loader = loader.region(Region::new(aws.region.clone()));
        }
        if !aws.endpoint.is_empty() {
            loader = loader.endpoint_url(aws.endpoint.clone());
        }
        if !aws.profile.is_empty() {
            loader = loader.profile_name(aws.profile.clone());
        }
        if !aws.access_key_id.is_empty() {
            loader = loader.credentials_provider(Credentials::new(
                aws.access_key_id.expose(),
                aws.secret_access_key.expose(),
                None,
                None,
                "autoscaler.ini",
            ));
        }
        let sdk = loader.load().await;
        let user_data = match &launch.user_data_file {
            None => None,
            Some(p) => {
                let bad = |message: String| Ec2Error {
                    operation: "RunInstances",
                    message,
                    retryable: false,
                    not_found: false,
                };
                let bytes = std::fs::read(p).map_err(|e| {
                    bad(format!(
                        "cannot read [launch] user_data_file {}: {e}",
                        p.display()
                    ))
                })?;
                let data = UserData {
                    text: bytes,
                    secret: report_secret.map(<[u8]>::to_vec),
                };
                // A file that cannot be filled in is refused now, not at the first launch.
                data.for_launch("check")
                    .map_err(|m| bad(format!("[launch] user_data_file {}: {m}", p.display())))?;
                Some(data)
            }
        };
        Ok(SdkEc2 {
            client: aws_sdk_ec2::Client::new(&sdk),
            launch: launch.clone(),
            user_data,
        })
    }
}

/// What a user-data file writes where the report secret goes (the shipped cloud-init file
/// puts it in the node's report.key).
pub const REPORT_SECRET_PLACEHOLDER: &str = "{{ report_secret }}";

/// `user_data` with [`REPORT_SECRET_PLACEHOLDER`] replaced by `secret`.
fn with_secret(user_data: Vec<u8>, secret: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let needle = REPORT_SECRET_PLACEHOLDER.as_bytes();
    if !user_data.windows(needle.len()).any(|w| w == needle) {
        return Ok(user_data);
    }
    let secret = secret.ok_or(
        "it asks for the report secret ({{ report_secret }}) but [node] secret_file is empty",
    )?;
    let text = String::from_utf8(user_data).map_err(|_| "not UTF-8 text")?;
    let secret = std::str::from_utf8(secret).map_err(|_| "the report secret is not text")?;
    Ok(text.replace(REPORT_SECRET_PLACEHOLDER, secret).into_bytes())
}

fn info(i: &aws_sdk_ec2::types::Instance) -> Option<InstanceInfo> {
    Some(InstanceInfo {
        instance_id: i.instance_id()?.to_string(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map_or("unknown", InstanceStateName::as_str)
            .to_string(),
        private_ip: i.private_ip_address().map(String::from),
        decision: i
            .tags()
            .iter()
            .find(|t| t.key() == Some(DECISION_TAG))
            .and_then(|t| t.value())
            .map(String::from),
    })
}

/// Error codes EC2 uses for throttling and its own failures.
const RETRYABLE_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "InsufficientInstanceCapacity",
];

fn err<E>(operation: &'static str, e: SdkError<E, HttpResponse>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (retryable, not_found) = match &e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            (true, false)
        }
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or_default();
            (
                RETRYABLE_CODES.contains(&code) || s.raw().status().is_server_error(),
                code.starts_with("InvalidInstanceID.NotFound"),
            )
        }
        _ => (false, false),
    };
    Ec2Error {
        operation,
        message: DisplayErrorContext(e).to_string(),
        retryable,
        not_found,
    }
}

impl Ec2Api for SdkEc2 {
    fn run_instances<'a>(&'a self, count: u32, decision: &'a str) -> Fut<'a, Vec<InstanceInfo>> {
        Box::pin(async move {
            let l = &self.launch;
            let tag = |k: &str, v: &str| Tag::builder().key(k).value(v).build();
            let mut req = self
                .client
                .run_instances()
                .min_count(count as i32)
                .max_count(count as i32)
                .client_token(decision)
                .tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::Instance)
                        .tags(tag(GROUP_TAG, &l.group))
                        .tags(tag(DECISION_TAG, decision))
                        .build(),
                );
            if !l.image_id.is_empty() {
                req = req.image_id(&l.image_id);
            }
            if !l.launch_template.is_empty() {
                let mut spec = LaunchTemplateSpecification::builder();
                spec = if l.launch_template.starts_with("lt-") {
                    spec.launch_template_id(&l.launch_template)
                } else {
                    spec.launch_template_name(&l.launch_template)
                };
                if !l.launch_template_version.is_empty() {
                    spec = spec.version(&l.launch_template_version);
                }
                req = req.launch_template(spec.build());
            } else {
                req = req.instance_type(InstanceType::from(l.instance_type.as_str()));
            }
            if !l.subnet_id.is_empty() {
                req = req.subnet_id(&l.subnet_id);
            }
            if !l.security_group_ids.is_empty() {
                req = req.set_security_group_ids(Some(l.security_group_ids.clone()));
            }
            if !l.key_name.is_empty() {
                req = req.key_name(&l.key_name);
            }
            if !l.iam_instance_profile.is_empty() {
                let p = IamInstanceProfileSpecification::builder();
                req = req.iam_instance_profile(if l.iam_instance_profile.starts_with("arn:") {
                    p.arn(&l.iam_instance_profile).build()
                } else {
                    p.name(&l.iam_instance_profile).build()
                });
            }
            if let Some(u) = &self.user_data {
                let text = u.for_launch(decision).map_err(|message| Ec2Error {
                    operation: "RunInstances",
                    message,
                    retryable: false,
                    not_found: false,
                })?;
                req = req.user_data(text);
            }
            // No blind retry: the launcher looks for the decision's instances first.
            let out = req
                .customize()
                .config_override(Config::builder().retry_config(RetryConfig::disabled()))
                .send()
                .await
                .map_err(|e| err("RunInstances", e))?;
            Ok(out.instances().iter().filter_map(info).collect())
        })
    }

    fn describe<'a>(&'a self, decision: Option<&'a str>) -> Fut<'a, Vec<InstanceInfo>> {
        Box::pin(async move {
            let mut found = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut req = self.client.describe_instances().filters(
                    Filter::builder()
                        .name(format!("tag:{GROUP_TAG}"))
                        .values(&self.launch.group)
                        .build(),
                );
                if let Some(d) = decision {
                    req = req.filters(
                        Filter::builder()
                            .name(format!("tag:{DECISION_TAG}"))
                            .values(d)
                            .build(),
                    );
                }
                if let Some(t) = &token {
                    req = req.next_token(t);
                }
                let out = req.send().await.map_err(|e| err("DescribeInstances", e))?;
                found.extend(
                    out.reservations()
                        .iter()
                        .flat_map(|r| r.instances())
                        .filter_map(info),
                );
                match out.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => return Ok(found),
                }
            }
        })
    }

    fn terminate<'a>(&'a self, instance_id: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            self.client
                .terminate_instances()
                .instance_ids(instance_id)
                .send()
                .await
                .map_err(|e| err("TerminateInstances", e))?;
            Ok(())
        })
    }

    fn console_output<'a>(&'a self, instance_id: &'a str) -> Fut<'a, String> {
        Box::pin(async move {
            let out = self
                .client
                .get_console_output()
                .instance_id(instance_id)
                .latest(true)
                .send()
                .await
                .map_err(|e| err("GetConsoleOutput", e))?;
            use base64::Engine;
            let bytes = out
                .output()
                .map(|o| base64::engine::general_purpose::STANDARD.decode(o.trim()))
                .transpose()
                .map_err(|e| Ec2Error {
                    operation: "GetConsoleOutput",
                    message: format!("output is not base64: {e}"),
                    retryable: false,
                    not_found: false,
                })?
                .unwrap_or_default();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_secret_goes_where_the_user_data_asks() {
        let plain = b"#cloud-config\nruncmd: []\n".to_vec();
        assert_eq!(with_secret(plain.clone(), None).unwrap(), plain);
        let asks = b"write_files:\n  - content: '{{ report_secret }}'\n".to_vec();
        assert_eq!(
            with_secret(asks.clone(), Some(b"s3cr3t")).unwrap(),
            b"write_files:\n  - content: 's3cr3t'\n"
        );
        let e = with_secret(asks.clone(), None).unwrap_err();
        assert!(e.contains("secret_file is empty"), "{e}");
        // Each launch gets its own key, derived from the secret: never the secret itself.
        let data = UserData {
            text: asks,
            secret: Some(b"the fleet's report secret, 32+ chars".to_vec()),
        };
        use base64::Engine;
        let decode = |b64: String| {
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            )
            .unwrap()
        };
        let a = decode(data.for_launch("as-1-a").unwrap());
        let b = decode(data.for_launch("as-1-b").unwrap());
        let key_a = crate::report::launch_key(b"the fleet's report secret, 32+ chars", "as-1-a");
        assert_eq!(a, format!("write_files:\n  - content: '{key_a}'\n"));
        assert_ne!(a, b);
        assert!(!a.contains("fleet"));
    }
}
