//! The integration tests: one test binary (so the heavy dependency graph links once), a module
//! per subsystem. Each test starts the real parts it needs — HAProxy, sshd, the moto EC2 API
//! server, the built `autoscaler` binary — on loopback or in network namespaces it creates,
//! and cleans up after itself.

mod common;

mod cli;
mod cluster;
mod contrib;
mod crash;
mod haproxy_writer;
mod launch;
mod operator;
mod signals;
mod toolchain;
mod tunnels;
mod walkthrough;
