//! autoscaler's library: configuration, the host registry, HAProxy rendering and, on top of
//! them, the actors of the master and node daemons.
//!
//! # Layout
//!
//! - [`config`]: `autoscaler.ini` → typed [`config::Config`], every problem reported at once.
//! - [`hosts`]: host/port validation and the `hosts.d` directory (one file per backend).
//! - [`render`]: tera templates → haproxy.cfg and autoscaler.ini.
//! - [`haproxy`]: validating a candidate haproxy.cfg and installing it without ever replacing a
//!   good config with a bad one.
//! - [`commands`]: `init` and `generate`, the one-shot commands behind the binary.
//! - [`fsutil`]: atomic writes.
#![forbid(unsafe_code)]

pub mod commands;
pub mod config;
pub mod fsutil;
pub mod haproxy;
pub mod hosts;
pub mod render;
