//! The pure layer of autoscaler: plain functions over plain data, with no tokio, actix, AWS
//! or SSH in them, unit-tested exhaustively and fast to build (the fuzz target and the render
//! benchmark depend on this crate alone).
//!
//! - [`config`]: `autoscaler.ini` → typed [`config::Config`], from one table of keys.
//! - [`hosts`]: host names and ports as users type them; the text of a host file.
//! - [`report`]: the node → master report protocol (codec, channel state, duplicate filter).
//! - [`policy`]: the scaling decision as a function of samples, history and time.
//! - [`simulate`]: recorded load replayed through the policy, in simulated time.
//! - [`render`]: haproxy.cfg from the host list (tera), with what applying it needs.
//! - [`haproxy_api`]: HAProxy's runtime API as text: commands and answers.
//! - [`backoff`]: jittered exponential delays for reconnect loops.
//!
//! The I/O adapters and the actors that use all this live in `autoscaler-actors`.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod haproxy_api;
pub mod hosts;
pub mod outage;
pub mod policy;
pub mod render;
pub mod report;
pub mod simulate;

/// Golden files of this crate's tests (`golden/`): compared byte for byte;
/// `UPDATE_GOLDEN=1` rewrites them instead.
#[cfg(test)]
pub(crate) mod golden {
    use std::path::Path;

    pub fn check(name: &str, got: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("golden")
            .join(name);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, got).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
                path.display()
            )
        });
        assert_eq!(got, want, "differs from {}", path.display());
    }
}
