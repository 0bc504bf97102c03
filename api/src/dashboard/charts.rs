//! The overview's charts: how the platform moved over the last hour or day, drawn
//! as SVG on the server from the database. Queue depth, spawns in flight and active
//! servers come from the workers' samples (one a minute, `Console::record_sample`)
//! and end with a reading taken now; spawn latency and failures come from the jobs
//! themselves. No script draws them.

use chrono::{DateTime, TimeDelta, Utc};
use maud::{Markup, html};
use schema::{JobKind, JobState, console::EndedJob, console::Sample, prelude::*};

use crate::{AppState, error::ApiError};

/// How far back the charts look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Hour,
    Day,
}

impl Window {
    /// `?chart=day`, else the last hour.
    pub fn parse(value: Option<&str>) -> Self {
        match value {
            Some("day") => Window::Day,
            _ => Window::Hour,
        }
    }

    fn span(self) -> TimeDelta {
        match self {
            Window::Hour => TimeDelta::hours(1),
            Window::Day => TimeDelta::days(1),
        }
    }

    /// Minutes over the hour, quarter hours over the day.
    fn buckets(self) -> usize {
        match self {
            Window::Hour => 60,
            Window::Day => 96,
        }
    }

    fn since_label(self) -> &'static str {
        match self {
            Window::Hour => "−60 min",
            Window::Day => "−24 h",
        }
    }
}

/// Values over the window's buckets, oldest first; `None` where nothing was seen.
type Points = Vec<Option<f64>>;

struct Buckets {
    start: DateTime<Utc>,
    width: TimeDelta,
    count: usize,
}

impl Buckets {
    fn new(window: Window, now: DateTime<Utc>) -> Self {
        let count = window.buckets();
        Self {
            start: now - window.span(),
            width: window.span() / count as i32,
            count,
        }
    }

    fn index(&self, at: DateTime<Utc>) -> Option<usize> {
        let offset = (at - self.start).num_milliseconds();
        if offset < 0 {
            return None;
        }
        let i = (offset / self.width.num_milliseconds().max(1)) as usize;
        Some(i.min(self.count - 1))
    }

    /// The highest reading in each bucket: a peak within a quarter hour shows.
    fn peaks(&self, samples: &[Sample], read: impl Fn(&Sample) -> i64, now: i64) -> Points {
        let mut points = vec![None; self.count];
        for s in samples {
            if let Some(i) = self.index(s.at) {
                let v = read(s) as f64;
                points[i] = Some(points[i].map_or(v, |p: f64| p.max(v)));
            }
        }
        let last = &mut points[self.count - 1];
        *last = Some(last.map_or(now as f64, |p| p.max(now as f64)));
        points
    }

    /// The `q` quantile of the seconds from request to ready of the spawns that
    /// succeeded in each bucket.
    fn latency(&self, ended: &[EndedJob], q: f64) -> Points {
        let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); self.count];
        for j in ended {
            if j.kind == JobKind::Spawn
                && j.state == JobState::Succeeded
                && let Some(i) = self.index(j.finished_at)
            {
                seconds[i].push((j.finished_at - j.created_at).num_milliseconds() as f64 / 1e3);
            }
        }
        seconds
            .into_iter()
            .map(|mut s| {
                if s.is_empty() {
                    return None;
                }
                s.sort_by(f64::total_cmp);
                let rank = ((s.len() as f64 * q).ceil() as usize).clamp(1, s.len());
                Some(s[rank - 1])
            })
            .collect()
    }

    /// Jobs of any kind that failed in each bucket.
    fn failures(&self, ended: &[EndedJob]) -> Points {
        let mut counts = vec![0.0; self.count];
        for j in ended {
            if j.state == JobState::Failed
                && let Some(i) = self.index(j.finished_at)
            {
                counts[i] += 1.0;
            }
        }
        counts.into_iter().map(Some).collect()
    }
}

struct Line {
    label: &'static str,
    points: Points,
}

struct Chart {
    /// For tests and links: `data-chart`.
    key: &'static str,
    title: &'static str,
    unit: &'static str,
    lines: Vec<Line>,
    /// Drawn as bars (counts per bucket) rather than lines.
    bars: bool,
    limit: Option<u32>,
    /// What the caption says now.
    latest: String,
}

/// The charts of `window`, with links to the other window.
pub async fn section(state: &AppState, window: Window) -> Result<Markup, ApiError> {
    let now = Utc::now();
    let buckets = Buckets::new(window, now);
    let since = buckets.start;
    let samples = state.db.samples_since(since).await?;
    let ended = state.db.jobs_ended_since(since).await?;
    let usage = state.db.usage().await?;
    let limits = state.limits().await?;
    let queued = state
        .db
        .job_counts()
        .await?
        .iter()
        .filter(|c| c.state == JobState::Queued)
        .map(|c| c.count)
        .sum::<i64>();
    let p50 = buckets.latency(&ended, 0.5);
    let p95 = buckets.latency(&ended, 0.95);
    let failures = buckets.failures(&ended);
    let failed_total = failures.iter().flatten().sum::<f64>();
    let charts = [
        Chart {
            key: "queue_depth",
            title: "Queue depth",
            unit: "jobs",
            lines: vec![Line {
                label: "queued",
                points: buckets.peaks(&samples, |s| s.queued, queued),
            }],
            bars: false,
            limit: None,
            latest: queued.to_string(),
        },
        Chart {
            key: "spawns_in_flight",
            title: "Spawns in flight",
            unit: "spawns",
            lines: vec![Line {
                label: "in flight",
                points: buckets.peaks(&samples, |s| s.spawns_in_flight, usage.spawns_in_flight),
            }],
            bars: false,
            limit: Some(limits.concurrent_spawn_limit),
            latest: usage.spawns_in_flight.to_string(),
        },
        Chart {
            key: "active_servers",
            title: "Active servers",
            unit: "servers",
            lines: vec![Line {
                label: "active",
                points: buckets.peaks(&samples, |s| s.active_servers, usage.active_servers),
            }],
            bars: false,
            limit: Some(limits.active_server_limit),
            latest: usage.active_servers.to_string(),
        },
        Chart {
            key: "spawn_latency",
            title: "Spawn latency",
            unit: "s",
            latest: p50
                .iter()
                .rev()
                .flatten()
                .next()
                .map_or("no spawns".into(), |v| format!("p50 {}", seconds(*v))),
            lines: vec![
                Line {
                    label: "p50",
                    points: p50,
                },
                Line {
                    label: "p95",
                    points: p95,
                },
            ],
            bars: false,
            limit: None,
        },
        Chart {
            key: "failures",
            title: "Failed jobs",
            unit: "jobs",
            lines: vec![Line {
                label: "failed",
                points: failures,
            }],
            bars: true,
            limit: None,
            latest: format!("{failed_total} in all"),
        },
    ];
    let other = match window {
        Window::Hour => ("day", "Last day"),
        Window::Day => ("hour", "Last hour"),
    };
    Ok(html! {
        section.charts-head {
            h2 { @if window == Window::Hour { "The last hour" } @else { "The last day" } }
            a href=(format!("/admin?chart={}", other.0)) { (other.1) }
        }
        section.charts data-window=(if window == Window::Hour { "hour" } else { "day" }) {
            @for chart in &charts { (draw(chart, window)) }
        }
    })
}

fn seconds(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.1} s")
    } else {
        format!("{v:.0} s")
    }
}

/// A round top for the axis: 1, 2 or 5 times a power of ten.
fn nice(max: f64) -> f64 {
    if max <= 1.0 {
        return 1.0;
    }
    let power = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * power)
}

const WIDTH: f64 = 360.0;
const HEIGHT: f64 = 120.0;
const LEFT: f64 = 34.0;
const BOTTOM: f64 = 16.0;
const TOP: f64 = 6.0;

fn draw(chart: &Chart, window: Window) -> Markup {
    let count = chart.lines.first().map_or(1, |l| l.points.len()).max(1);
    let highest = chart
        .lines
        .iter()
        .flat_map(|l| l.points.iter().flatten())
        .copied()
        .chain(chart.limit.map(f64::from))
        .fold(0.0, f64::max);
    let top = nice(highest * 1.1);
    let plot_w = WIDTH - LEFT - 4.0;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |i: usize| LEFT + plot_w * (i as f64 + 0.5) / count as f64;
    let y = |v: f64| TOP + plot_h * (1.0 - v / top);
    let label = |v: f64| {
        if chart.unit == "s" {
            seconds(v)
        } else {
            format!("{v}")
        }
    };
    html! {
        figure.chart data-chart=(chart.key) data-latest=(chart.latest) {
            figcaption { span.title { (chart.title) } " " span.latest { (chart.latest) } }
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(format!("{} over the {}", chart.title, if window == Window::Hour { "last hour" } else { "last day" })) {
                g.grid {
                    line x1=(LEFT) x2=(WIDTH - 4.0) y1=(y(0.0)) y2=(y(0.0)) {}
                    line x1=(LEFT) x2=(WIDTH - 4.0) y1=(y(top)) y2=(y(top)) {}
                }
                g.axis {
                    text x=(LEFT - 4.0) y=(y(top) + 4.0) text-anchor="end" { (label(top)) }
                    text x=(LEFT - 4.0) y=(y(0.0)) text-anchor="end" { "0" }
                    text x=(LEFT) y=(HEIGHT - 3.0) { (window.since_label()) }
                    text x=(WIDTH - 4.0) y=(HEIGHT - 3.0) text-anchor="end" { "now" }
                }
                @if let Some(limit) = chart.limit {
                    line.limit x1=(LEFT) x2=(WIDTH - 4.0) y1=(y(f64::from(limit))) y2=(y(f64::from(limit))) {}
                    text.limit-label x=(WIDTH - 6.0) y=(y(f64::from(limit)) - 3.0) text-anchor="end" { "limit " (limit) }
                }
                @for (n, line) in chart.lines.iter().enumerate() {
                    @if chart.bars {
                        @let bar_w = (plot_w / count as f64 * 0.8).max(1.0);
                        @for (i, v) in line.points.iter().enumerate() {
                            @if let Some(v) = v.filter(|v| *v > 0.0) {
                                rect.bar x=(x(i) - bar_w / 2.0) y=(y(v)) width=(bar_w) height=(y(0.0) - y(v)) {
                                    title { (v) " " (line.label) }
                                }
                            }
                        }
                    } @else {
                        @for run in runs(&line.points) {
                            @if run.len() == 1 {
                                circle class=(format!("dot s{n}")) cx=(x(run[0].0)) cy=(y(run[0].1)) r="2" {}
                            } @else {
                                polyline class=(format!("line s{n}")) points=(run.iter().map(|(i, v)| format!("{:.1},{:.1}", x(*i), y(*v))).collect::<Vec<_>>().join(" ")) {}
                            }
                        }
                    }
                }
            }
            @if chart.lines.len() > 1 {
                p.legend { @for (n, line) in chart.lines.iter().enumerate() { span class=(format!("key s{n}")) { (line.label) } " " } }
            }
        }
    }
}

/// The stretches of consecutive points that have values.
fn runs(points: &[Option<f64>]) -> Vec<Vec<(usize, f64)>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (i, p) in points.iter().enumerate() {
        match p {
            Some(v) => run.push((i, *v)),
            None if !run.is_empty() => runs.push(std::mem::take(&mut run)),
            None => {}
        }
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_tops_are_round() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(1.1), 2.0);
        assert_eq!(nice(2.2), 5.0);
        assert_eq!(nice(55.0), 100.0);
        assert_eq!(nice(10.0), 10.0);
    }

    #[test]
    fn gaps_split_lines() {
        let r = runs(&[Some(1.0), None, Some(2.0), Some(3.0), None]);
        assert_eq!(r, vec![vec![(0, 1.0)], vec![(2, 2.0), (3, 3.0)]]);
    }
}
