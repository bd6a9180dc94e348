//! slog set-up: human-readable or JSON lines on standard error, level from -v/-q.

use slog::{o, Drain, Level, Logger};

use crate::cli::LogFormat;

/// Builds the root logger. Keep the guard alive until exit: dropping it flushes the queue.
pub fn build(format: LogFormat, verbose: u8, quiet: u8) -> (Logger, slog_async::AsyncGuard) {
    let level = match (verbose, quiet) {
        (0, 0) => Level::Info,
        (1, _) => Level::Debug,
        (_, 0) => Level::Trace,
        (_, 1) => Level::Warning,
        (_, 2) => Level::Error,
        _ => Level::Critical,
    };
    let drain: Box<dyn Drain<Ok = (), Err = slog::Never> + Send> = match format {
        LogFormat::Human => {
            let decorator = slog_term::TermDecorator::new().stderr().build();
            Box::new(slog_term::FullFormat::new(decorator).build().fuse())
        }
        LogFormat::Json => Box::new(
            slog_json::Json::new(std::io::stderr())
                .add_default_keys()
                .build()
                .fuse(),
        ),
    };
    // The level is checked before the queue: a record below it costs a comparison, not a
    // serialisation and a hand-off to the logging thread (the master logs a debug line per
    // report).
    let (drain, guard) = slog_async::Async::new(drain)
        .chan_size(4096)
        .overflow_strategy(slog_async::OverflowStrategy::Block)
        .build_with_guard();
    (Logger::root(drain.filter_level(level).fuse(), o!()), guard)
}
