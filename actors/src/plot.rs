//! The plot `autoscaler simulate --svg` draws (plotters, SVG backend, no fonts needed): each
//! node's CPU with the thresholds and the decisions on top, the node count below, and between
//! them, when the trace has HAProxy's figures and a HAProxy signal is on, each signal against
//! its target.

use plotters::prelude::*;

use crate::config::{Policy, Scaling};
use crate::policy::Signal;
use crate::simulate::{clock, EventKind, Outcome};

/// Most points drawn per line: a day at one frame a second would make a file of megabytes
/// and show nothing more.
const MAX_POINTS: usize = 1500;

const UP: RGBColor = RGBColor(200, 40, 40);
const DOWN: RGBColor = RGBColor(40, 90, 200);

/// Why a plot could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the plot: {0}")]
pub struct PlotError(String);

fn err<E: std::fmt::Debug>(e: E) -> PlotError {
    PlotError(format!("{e:?}"))
}

/// The lines to draw for the thresholds of `cfg`: (value, label, colour).
fn thresholds(cfg: &Scaling) -> Vec<(f64, String, RGBColor)> {
    match cfg.policy {
        Policy::Instance => vec![
            (
                cfg.scale_up_threshold,
                format!("scale_up_threshold {}%", cfg.scale_up_threshold),
                UP,
            ),
            (
                cfg.scale_down_threshold,
                format!("scale_down_threshold {}%", cfg.scale_down_threshold),
                DOWN,
            ),
        ],
        Policy::Cluster => vec![
            (
                cfg.target_cpu * (1.0 + cfg.tolerance),
                format!("target_cpu {}% + tolerance", cfg.target_cpu),
                UP,
            ),
            (
                cfg.target_cpu,
                format!("target_cpu {}%", cfg.target_cpu),
                BLACK,
            ),
            (
                cfg.target_cpu * (1.0 - cfg.tolerance),
                format!("target_cpu {}% - tolerance", cfg.target_cpu),
                DOWN,
            ),
        ],
    }
}

/// Points of a line: (x, y).
type Line = Vec<(f64, f64)>;

/// Each node's CPU as lines of (t, %), split where the node was not serving, thinned to at
/// most [`MAX_POINTS`] per node (each point the mean of the frames it stands for).
fn node_lines(o: &Outcome) -> Vec<(String, Vec<Line>)> {
    let stride = o.frames.len().div_ceil(MAX_POINTS).max(1);
    let mut names: Vec<String> = Vec::new();
    for f in &o.frames {
        for (n, _) in &f.cpu {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    names
        .into_iter()
        .map(|name| {
            let mut lines: Vec<Line> = Vec::new();
            let mut open = false;
            for chunk in o.frames.chunks(stride) {
                let vals: Vec<f64> = chunk
                    .iter()
                    .filter_map(|f| f.cpu.iter().find(|(n, _)| *n == name).map(|(_, c)| *c))
                    .collect();
                if vals.is_empty() {
                    open = false;
                    continue;
                }
                let point = (chunk[0].t, vals.iter().sum::<f64>() / vals.len() as f64);
                match open {
                    true => lines.last_mut().expect("open line").push(point),
                    false => lines.push(vec![point]),
                }
                open = true;
            }
            (name, lines)
        })
        .collect()
}

/// Each HAProxy signal that is on, as a percentage of its target per node through the
/// replay (requests and sessions: per serving node; response time: as measured; queue: the
/// requests waiting, as they are); thinned as the nodes' lines are.
fn signal_lines(o: &Outcome, cfg: &Scaling) -> Vec<(String, Line)> {
    let stride = o.frames.len().div_ceil(MAX_POINTS).max(1);
    Signal::ALL
        .into_iter()
        .filter_map(|signal| {
            let target = signal.target(cfg)?;
            let label = match signal {
                Signal::Requests => format!("requests/s per node, % of {target}"),
                Signal::Sessions => format!("sessions per node, % of {target}"),
                Signal::ResponseTime => format!("response time, % of {target:.0} ms"),
                Signal::Queue => "requests queued".to_string(),
            };
            let line: Line = o
                .frames
                .chunks(stride)
                .filter_map(|chunk| {
                    let vals: Vec<f64> = chunk
                        .iter()
                        .filter_map(|f| {
                            let b = f.backend?;
                            let per_node = |x: f64| 100.0 * x / f.nodes.max(1) as f64 / target;
                            match signal {
                                Signal::Requests => Some(per_node(b.rate)),
                                Signal::Sessions => Some(per_node(b.sessions)),
                                Signal::ResponseTime => b.rtime_ms.map(|r| 100.0 * r / target),
                                Signal::Queue => Some(b.queue),
                            }
                        })
                        .collect();
                    (!vals.is_empty())
                        .then(|| (chunk[0].t, vals.iter().sum::<f64>() / vals.len() as f64))
                })
                .collect();
            (!line.is_empty()).then_some((label, line))
        })
        .collect()
}

/// The node count as a step line: a point where it changes.
fn node_steps(o: &Outcome) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for f in &o.frames {
        let n = f.nodes as f64;
        match out.last() {
            Some(&(_, last)) if last == n => {}
            Some(_) => {
                out.push((f.t, out.last().expect("not empty").1));
                out.push((f.t, n));
            }
            None => out.push((f.t, n)),
        }
    }
    if let (Some(f), Some(&(_, n))) = (o.frames.last(), out.last()) {
        out.push((f.t, n));
    }
    out
}

/// `o` with its times divided by `unit` (seconds per unit of the x axis).
fn scaled(o: &Outcome, unit: f64) -> Outcome {
    let mut o = o.clone();
    o.frames.iter_mut().for_each(|f| f.t /= unit);
    o.events.iter_mut().for_each(|e| e.t /= unit);
    o
}

/// The plot of `o` (replayed with `cfg`) as an SVG document.
pub fn svg(o: &Outcome, cfg: &Scaling, title: &str) -> Result<String, PlotError> {
    let (Some(first), Some(last)) = (o.frames.first(), o.frames.last()) else {
        return Err(PlotError("nothing was replayed".into()));
    };
    // The x axis in minutes (or hours for long traces), so its ticks fall on round times.
    let unit = if last.t - first.t <= 3.0 * 3600.0 {
        60.0
    } else {
        3600.0
    };
    let (t0, t1) = (first.t / unit, last.t.max(first.t + 1.0) / unit);
    let o = &scaled(o, unit);
    let signals = signal_lines(o, cfg);
    let mut out = String::new();
    {
        let height = if signals.is_empty() { 640 } else { 880 };
        let root = SVGBackend::with_string(&mut out, (1100, height)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let (top, rest) = root.split_vertically(440);
        let (middle, bottom) = match signals.is_empty() {
            true => (None, rest),
            false => {
                let (m, b) = rest.split_vertically(240);
                (Some(m), b)
            }
        };
        let x_label = |t: &f64| clock(*t * unit);

        let mut cpu = ChartBuilder::on(&top)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(t0..t1, 0.0..100.0)
            .map_err(err)?;
        cpu.configure_mesh()
            .x_label_formatter(&x_label)
            .y_desc("busy CPU %")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for (value, label, colour) in thresholds(cfg) {
            cpu.draw_series(LineSeries::new(
                [(t0, value), (t1, value)],
                colour.stroke_width(1),
            ))
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour));
        }
        for (i, (name, lines)) in node_lines(o).into_iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            for (j, line) in lines.into_iter().enumerate() {
                let series = cpu
                    .draw_series(LineSeries::new(line, colour.stroke_width(1)))
                    .map_err(err)?;
                if j == 0 {
                    series
                        .label(name.clone())
                        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour));
                }
            }
        }
        for e in &o.events {
            let colour = match e.kind {
                EventKind::ScaleUp { .. } => UP,
                EventKind::ScaleDown { .. } => DOWN,
                _ => continue,
            };
            cpu.draw_series(LineSeries::new(
                [(e.t, 0.0), (e.t, 100.0)],
                colour.mix(0.5).stroke_width(1),
            ))
            .map_err(err)?;
        }
        cpu.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;

        if let Some(middle) = middle {
            let high = signals
                .iter()
                .flat_map(|(_, l)| l.iter().map(|p| p.1))
                .fold(150.0, f64::max)
                * 1.05;
            let mut lb = ChartBuilder::on(&middle)
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(t0..t1, 0.0..high)
                .map_err(err)?;
            lb.configure_mesh()
                .x_label_formatter(&x_label)
                .y_desc("HAProxy, % of target")
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(err)?;
            lb.draw_series(LineSeries::new(
                [(t0, 100.0), (t1, 100.0)],
                UP.stroke_width(1),
            ))
            .map_err(err)?
            .label("target")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], UP));
            for (i, (label, line)) in signals.into_iter().enumerate() {
                let colour = Palette99::pick(i + 5).to_rgba();
                lb.draw_series(LineSeries::new(line, colour.stroke_width(2)))
                    .map_err(err)?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour));
            }
            lb.configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .draw()
                .map_err(err)?;
        }

        let most = o.max_nodes.max(1) as f64 + 1.0;
        let mut count = ChartBuilder::on(&bottom)
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(t0..t1, 0.0..most)
            .map_err(err)?;
        count
            .configure_mesh()
            .x_label_formatter(&x_label)
            .y_labels(most as usize + 1)
            .x_desc("time from the start of the trace")
            .y_desc("nodes serving")
            .y_label_formatter(&|v: &f64| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        count
            .draw_series(LineSeries::new(node_steps(o), BLACK.stroke_width(2)))
            .map_err(err)?
            .label("nodes serving")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        count
            .draw_series(
                o.events
                    .iter()
                    .filter(|e| matches!(e.kind, EventKind::ScaleUp { .. }))
                    .map(|e| TriangleMarker::new((e.t, most - 0.3), 6, UP.filled())),
            )
            .map_err(err)?
            .label("scale-up decision")
            .legend(|(x, y)| TriangleMarker::new((x + 10, y), 5, UP.filled()));
        count
            .draw_series(
                o.events
                    .iter()
                    .filter(|e| matches!(e.kind, EventKind::ScaleDown { .. }))
                    .map(|e| Circle::new((e.t, most - 0.3), 5, DOWN.filled())),
            )
            .map_err(err)?
            .label("scale-in decision")
            .legend(|(x, y)| Circle::new((x + 10, y), 4, DOWN.filled()));
        count
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Layout, Role};
    use crate::simulate::{run, Settings, Trace};
    use std::path::Path;

    fn spike() -> (Outcome, Scaling) {
        let mut cfg =
            Config::defaults(&Layout::for_dir(Path::new("/srv/as")), Role::Master).scaling;
        cfg.warmup = std::time::Duration::ZERO;
        let mut text = String::new();
        for t in (0..=3600).step_by(15) {
            let busy = if (600..1200).contains(&t) { 95.0 } else { 15.0 };
            text += &format!("{t},web-1,{busy}\n{t},web-2,{busy}\n");
        }
        (
            run(&cfg, &Trace::parse(&text).unwrap(), &Settings::default()),
            cfg,
        )
    }

    #[test]
    fn the_plot_shows_nodes_thresholds_and_decisions() {
        let (o, cfg) = spike();
        assert!(o.scale_ups > 0 && o.scale_downs > 0, "{:?}", o.events);
        let svg = svg(&o, &cfg, "spike").unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        for want in [
            "web-1",
            "web-2",
            "new-1",
            "scale_up_threshold 75%",
            "nodes serving",
            "spike",
            "scale-up decision",
            "scale-in decision",
        ] {
            assert!(svg.contains(want), "{want} missing");
        }
        // One vertical line per decision, one marker per decision.
        let polylines = svg.matches("<polyline").count();
        assert!(
            polylines >= 2 + 3 + (o.scale_ups + o.scale_downs) as usize,
            "{polylines}"
        );
        // Scale-ins have their own marker (and its legend entry).
        assert!(
            svg.matches("<circle").count() > o.scale_downs as usize,
            "{}",
            svg.matches("<circle").count()
        );
        // A parser accepts it (well-formed XML).
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.len() < 400_000, "{} bytes", svg.len());
    }

    /// With HAProxy's figures in the trace and a signal on, a panel shows each signal that
    /// is on against its target; without a signal on, none.
    #[test]
    fn the_plot_shows_haproxy_signals_against_their_targets() {
        let mut cfg =
            Config::defaults(&Layout::for_dir(Path::new("/srv/as")), Role::Master).scaling;
        cfg.warmup = std::time::Duration::ZERO;
        let mut text = String::from("time,node,busy,requests,sessions,queue,rtime_ms\n");
        for t in 0..=1200 {
            let n = if (300..900).contains(&t) { 6.0 } else { 0.0 };
            text += &format!("{t},web-1,4,{},{n},0,100\n", n * 10.0);
        }
        let trace = Trace::parse(&text).unwrap();
        let plain = svg(&run(&cfg, &trace, &Settings::default()), &cfg, "t").unwrap();
        assert!(!plain.contains("% of target"));
        cfg.target_sessions_per_node = Some(4.0);
        cfg.target_response_time = Some(std::time::Duration::from_millis(200));
        let o = run(&cfg, &trace, &Settings::default());
        assert!(o.scale_ups > 0, "{:?}", o.events);
        let lines = signal_lines(&o, &cfg);
        let names: Vec<&str> = lines.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["sessions per node, % of 4", "response time, % of 200 ms"]
        );
        // 6 in progress on one node is 150 % of the target, 75 % once two serve.
        let at = |t: f64| lines[0].1.iter().find(|p| p.0 == t).unwrap().1;
        assert_eq!(at(320.0), 150.0);
        assert_eq!(at(880.0), 75.0);
        assert_eq!(lines[1].1[0].1, 50.0);
        let plot = svg(&o, &cfg, "t").unwrap();
        for want in [
            "HAProxy, % of target",
            "sessions per node, % of 4",
            "target",
        ] {
            assert!(plot.contains(want), "{want} missing");
        }
    }

    #[test]
    fn long_traces_are_thinned() {
        let (mut o, _) = spike();
        let f = o.frames[0].clone();
        o.frames = (0..20_000)
            .map(|i| {
                let mut f = f.clone();
                f.t = f64::from(i);
                f
            })
            .collect();
        for (_, lines) in node_lines(&o) {
            let points: usize = lines.iter().map(Vec::len).sum();
            assert!(points <= MAX_POINTS, "{points}");
        }
    }

    #[test]
    fn steps_follow_the_count() {
        let (o, _) = spike();
        let steps = node_steps(&o);
        assert_eq!(steps.first().unwrap().1, 2.0);
        assert_eq!(
            steps.iter().map(|s| s.1 as usize).max().unwrap(),
            o.max_nodes
        );
        assert_eq!(
            steps.last().unwrap().1,
            o.frames.last().unwrap().nodes as f64
        );
    }
}
