//! The I/O adapters: everything that reaches outside the process, behind small typed APIs the
//! actors and the one-shot commands use. No actor lives here.
//!
//! - [`ec2`]: the EC2 calls behind one small trait, implemented with the AWS SDK.
//! - [`ssh`]: SSH sessions from the master and host-key checks (russh).
//! - [`known_hosts`]: the master's known_hosts file: launched hosts' keys in and out.
//! - [`process`]: running configured commands (argv, clean environment, timeout).
//! - [`files`]: atomic writes, exclusive creation, directory sync.
//! - [`hosts_dir`]: the hosts.d directory, one file per host.
//! - [`haproxy`]: validating a candidate haproxy.cfg and installing it without ever replacing
//!   a good config with a bad one.
//! - [`resolve`]: host names to the addresses HAProxy gets.

pub mod ec2;
pub mod etcd;
pub mod files;
pub mod haproxy;
pub mod host_store;
pub mod hosts_dir;
pub mod known_hosts;
pub mod process;
pub mod records;
pub mod resolve;
pub mod secret;
pub mod ssh;
