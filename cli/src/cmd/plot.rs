//! `ferrite job plot ID --out loss.png|loss.svg`: a job's train and val loss against step,
//! with the learning rate on a second y axis, drawn with `plotters`.
//!
//! The steps come from the coordinator (`WatchJob` with metrics): the steps it has seen since
//! it started. A finished job's stream replays them and ends; a running job's stream would go
//! on, so the plot takes what arrives until the replay has gone quiet.
//!
//! Text is drawn by `ab_glyph` from a TrueType font read at run time (no fontconfig or
//! FreeType): Debian's `fonts-dejavu-core`, or the file named by `FERRITE_PLOT_FONT`.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use ferrite_proto::v1 as pb;
use ferrite_security::AuthChannel;
use pb::job_service_client::JobServiceClient;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use tokio_stream::StreamExt;

use super::job::{state_name, status_error};

/// A running job's replay counts as over after this long without an event...
const QUIET: Duration = Duration::from_millis(300);
/// ...or this long after the snapshot, as live steps may keep the stream busy.
const RUNNING_CAP: Duration = Duration::from_secs(3);

/// Where fonts are on common distributions, Debian's first.
const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Format {
    Png,
    Svg,
}

impl Format {
    fn of(path: &Path) -> anyhow::Result<Format> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("png") => Ok(Format::Png),
            Some("svg") => Ok(Format::Svg),
            _ => bail!("--out {}: the file name must end in .png or .svg", path.display()),
        }
    }
}

/// One step's numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Point {
    loss: f32,
    val_loss: Option<f32>,
    lr: f32,
}

/// Fetches the job's steps and writes the plot to `out`.
pub(super) async fn run(
    mut client: JobServiceClient<AuthChannel>,
    id: String,
    out: PathBuf,
    size: (u32, u32),
) -> anyhow::Result<()> {
    let format = Format::of(&out)?;
    if size.0 < 200 || size.1 < 150 || size.0 > 10_000 || size.1 > 10_000 {
        bail!("--width and --height: {}x{} is outside 200x150..=10000x10000", size.0, size.1);
    }
    let req = pb::WatchJobRequest { job_id: id.clone(), include_metrics: true };
    let mut events = client.watch_job(req).await.map_err(status_error)?.into_inner();
    let mut job: Option<pb::Job> = None;
    // By step: a step reported again after a restart replaces the earlier report.
    let mut points: BTreeMap<u64, Point> = BTreeMap::new();
    let mut since = Instant::now();
    loop {
        let terminal = job.as_ref().is_some_and(|j| is_terminal(j.state));
        let next = if job.is_none() || terminal {
            events.next().await
        } else {
            let left = RUNNING_CAP.saturating_sub(since.elapsed());
            match tokio::time::timeout(QUIET.min(left), events.next()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        };
        let Some(msg) = next else { break };
        match msg.map_err(status_error)?.event {
            Some(pb::watch_job_response::Event::Snapshot(j)) => {
                job = Some(j);
                since = Instant::now();
            }
            Some(pb::watch_job_response::Event::StateChange(c)) => {
                if let Some(j) = job.as_mut() {
                    j.state = c.to;
                }
            }
            Some(pb::watch_job_response::Event::Metrics(m)) => {
                // Steps at or after this one are from an earlier attempt.
                drop(points.split_off(&m.step));
                let p = Point { loss: m.train_loss, val_loss: m.val_loss, lr: m.learning_rate };
                points.insert(m.step, p);
            }
            Some(pb::watch_job_response::Event::Checkpoint(_)) | None => {}
        }
    }
    let job = job.ok_or_else(|| anyhow!("the coordinator ended the watch of {id} without news"))?;
    if points.is_empty() {
        bail!(
            "job {id} ({}) has no step metrics on this coordinator (it keeps those it saw since \
             it started; the full record is metrics.jsonl in the job's output dir)",
            state_name(job.state)
        );
    }
    let name = job.spec.as_ref().map(|s| s.name.as_str()).unwrap_or_default();
    let title = match name {
        "" => format!("{id} ({})", state_name(job.state).to_lowercase()),
        n => format!("{id} {n} ({})", state_name(job.state).to_lowercase()),
    };
    let series: Vec<(u64, Point)> = points.into_iter().collect();
    load_font()?;
    let path = out.clone();
    tokio::task::spawn_blocking(move || draw_to(format, &path, size, &title, &series))
        .await
        .context("drawing the plot")??;
    println!("{}", out.display());
    Ok(())
}

fn is_terminal(state: i32) -> bool {
    [pb::JobState::Succeeded, pb::JobState::Failed, pb::JobState::Cancelled]
        .iter()
        .any(|s| *s as i32 == state)
}

fn draw_to(
    format: Format,
    path: &Path,
    size: (u32, u32),
    title: &str,
    series: &[(u64, Point)],
) -> anyhow::Result<()> {
    let written = match format {
        Format::Png => draw(BitMapBackend::new(path, size).into_drawing_area(), title, series),
        Format::Svg => draw(SVGBackend::new(path, size).into_drawing_area(), title, series),
    };
    written.with_context(|| format!("writing {}", path.display()))
}

/// Plotters' errors carry the backend's error type; one line is all the user needs.
fn drawn<T, E: Display>(r: Result<T, E>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow!("{e}"))
}

/// Train loss (line) and val loss (line with points) on the left axis, learning rate on
/// the right one.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    series: &[(u64, Point)],
) -> anyhow::Result<()> {
    drawn(root.fill(&WHITE))?;
    let first = series.first().map_or(0, |s| s.0) as f64;
    let last = series.last().map_or(1, |s| s.0) as f64;
    let steps = first..last.max(first + 1.0);
    let losses = series
        .iter()
        .flat_map(|(_, p)| [Some(p.loss), p.val_loss])
        .flatten()
        .filter(|l| l.is_finite())
        .map(f64::from);
    let (lo, hi) = padded(losses);
    let lrs = series.iter().map(|(_, p)| p.lr as f64).filter(|l| l.is_finite());
    let lr_top = lrs.fold(0.0f64, f64::max).max(1e-12) * 1.1;

    let mut chart = drawn(
        ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .right_y_label_area_size(76)
            .build_cartesian_2d(steps.clone(), lo..hi),
    )?
    .set_secondary_coord(steps, 0.0..lr_top);
    drawn(
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .draw(),
    )?;
    drawn(
        chart
            .configure_secondary_axes()
            .y_desc("learning rate")
            .y_label_formatter(&|v| format!("{v:.1e}"))
            .draw(),
    )?;

    let train_color = RGBColor(31, 119, 180);
    let val_color = RGBColor(255, 127, 14);
    let lr_color = RGBColor(44, 160, 44);
    let train = series.iter().map(|(s, p)| (*s as f64, p.loss as f64));
    drawn(chart.draw_series(LineSeries::new(train, train_color.stroke_width(2))))?
        .label("train loss")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], train_color));
    let val: Vec<(f64, f64)> =
        series.iter().filter_map(|(s, p)| p.val_loss.map(|v| (*s as f64, v as f64))).collect();
    if !val.is_empty() {
        drawn(chart.draw_series(LineSeries::new(val.clone(), val_color.stroke_width(2))))?
            .label("val loss")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], val_color));
        drawn(
            chart.draw_series(val.iter().map(|&(x, y)| Circle::new((x, y), 3, val_color.filled()))),
        )?;
    }
    let lr = series.iter().map(|(s, p)| (*s as f64, p.lr as f64));
    drawn(chart.draw_secondary_series(LineSeries::new(lr, lr_color.stroke_width(1))))?
        .label("learning rate")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], lr_color));
    drawn(
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 14))
            .draw(),
    )?;
    drawn(root.present())
}

/// The range of `values` with 5% room above and below (a flat series gets ±0.5).
fn padded(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// Registers a TrueType font with plotters' `ab_glyph` text backend, once per process.
fn load_font() -> anyhow::Result<()> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED.get_or_init(register_font).clone().map_err(|e| anyhow!(e))
}

fn register_font() -> Result<(), String> {
    let chosen = std::env::var_os("FERRITE_PLOT_FONT").map(PathBuf::from);
    let candidates: Vec<PathBuf> = match &chosen {
        Some(p) => vec![p.clone()],
        None => FONT_PATHS.iter().map(PathBuf::from).collect(),
    };
    let Some((path, bytes)) = candidates.iter().find_map(|p| Some((p, std::fs::read(p).ok()?)))
    else {
        return Err(match chosen {
            Some(p) => format!("FERRITE_PLOT_FONT={}: cannot read it", p.display()),
            None => "no font for the plot's text: install Debian's fonts-dejavu-core \
                     (scripts/install-deps.sh does) or set FERRITE_PLOT_FONT to a .ttf file"
                .to_owned(),
        });
    };
    // Plotters keeps fonts for the life of the process, as `&'static` bytes.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    for family in ["sans-serif", "serif", "monospace"] {
        plotters::style::register_font(family, FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a TrueType or OpenType font", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_chooses_the_format() {
        assert_eq!(Format::of(Path::new("a/loss.png")).unwrap(), Format::Png);
        assert_eq!(Format::of(Path::new("loss.SVG")).unwrap(), Format::Svg);
        let err = Format::of(Path::new("loss.jpg")).unwrap_err().to_string();
        assert!(err.contains(".png or .svg"), "{err}");
        assert!(Format::of(Path::new("loss")).is_err());
    }

    #[test]
    fn ranges_get_room_and_flat_series_get_height() {
        let (lo, hi) = padded([2.0, 4.0].into_iter());
        assert!((lo - 1.9).abs() < 1e-12 && (hi - 4.1).abs() < 1e-12, "{lo} {hi}");
        assert_eq!(padded([3.0].into_iter()), (2.5, 3.5));
        assert_eq!(padded(std::iter::empty()), (0.0, 1.0));
    }
}
