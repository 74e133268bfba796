//! The operator commands of the CLI (`start`, `show`, `list`, `wait`, `signal`, `abort`,
//! `retry`, `skip`, `resume`, `versions`, `schedule`): the same [`ops`](crate::ops) the HTTP API uses, against the
//! configured database, printed as tables or, with `--json`, as the API's JSON.

use std::time::Duration;

use sagas::protocol::StartRequest;
use sagas::{Input, OperatorCommand, Registry, SagaId};
use serde_json::Value;

use super::Command;
use crate::ops::{self, ErrorKind, ListFilter, OpsError, SagaView};
use crate::{Config, Orchestrator};

/// The arguments of `show`, `retry`, `skip` and `resume`: a saga.
#[derive(clap::Args)]
pub struct IdArgs {
    /// The saga's id.
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `sagaflow schedule ...`.
#[derive(clap::Subcommand)]
pub enum ScheduleCommand {
    /// Create or replace a schedule.
    Set(ScheduleSetArgs),
    /// Every schedule, with its next tick.
    List(JsonArg),
    /// One schedule.
    Show(ScheduleNameArgs),
    /// Delete a schedule (the sagas it started are not touched).
    Delete(ScheduleNameArgs),
    /// Pause a schedule: it fires nothing until resumed.
    Pause(ScheduleNameArgs),
    /// Resume a schedule from its next tick after now.
    Resume(ScheduleNameArgs),
}

/// `--json` alone.
#[derive(clap::Args)]
pub struct JsonArg {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A schedule's name.
#[derive(clap::Args)]
pub struct ScheduleNameArgs {
    /// The schedule's name.
    name: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `schedule set`.
#[derive(clap::Args)]
pub struct ScheduleSetArgs {
    /// The schedule's name (1-100 characters of a-z, A-Z, 0-9, `_`, `-`, `.`).
    name: String,
    /// The sagas it starts.
    #[command(flatten)]
    saga: SagaArgs,
    /// A cron expression, UTC: 5 fields (minute hour day-of-month month day-of-week) or 6 with
    /// seconds first; `@hourly`, `@daily`, …
    #[arg(long, conflicts_with = "at", required_unless_present = "at")]
    cron: Option<String>,
    /// Fire once at this time, in ms since the epoch.
    #[arg(long)]
    at: Option<u64>,
    /// What happens to ticks missed while no node ran: fire_once (default), fire_all, skip.
    #[arg(long)]
    missed: Option<String>,
    /// Create it paused.
    #[arg(long)]
    paused: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

async fn schedule_command(engine: &crate::Engine, cmd: ScheduleCommand) -> anyhow::Result<()> {
    use crate::schedules;
    let (shown, json) = match cmd {
        ScheduleCommand::Set(a) => {
            let missed = a
                .missed
                .as_deref()
                .map(sagas::schedule::Missed::parse)
                .transpose()
                .map_err(|e| OpsError::new(ErrorKind::InvalidRequest, e))?;
            let req = schedules::ScheduleRequest {
                definition: a.saga.definition,
                version: a.saga.version,
                input: json_arg("--input", &a.saga.input)?,
                cron: a.cron,
                at: a.at,
                missed,
                priority: a.saga.priority,
                paused: a.paused,
            };
            (vec![schedules::put(engine, &a.name, req).await?], a.json)
        }
        ScheduleCommand::List(a) => (schedules::list(engine).await?, a.json),
        ScheduleCommand::Show(a) => (vec![schedules::get(engine, &a.name).await?], a.json),
        ScheduleCommand::Delete(a) => {
            schedules::delete(engine, &a.name).await?;
            if a.json {
                println!("{}", serde_json::json!({"deleted": a.name}));
            } else {
                println!("schedule {} deleted", a.name);
            }
            return Ok(());
        }
        ScheduleCommand::Pause(a) => (vec![schedules::set_paused(engine, &a.name, true).await?], a.json),
        ScheduleCommand::Resume(a) => (vec![schedules::set_paused(engine, &a.name, false).await?], a.json),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    println!("{:<24} {:<24} {:<22} {:<10} {:<7} {:<15} LAST ERROR", "NAME", "DEFINITION", "WHEN", "MISSED", "PAUSED", "NEXT (ms)");
    for s in shown {
        let when = match &s.when {
            sagas::schedule::When::Cron { expr } => format!("cron {expr}"),
            sagas::schedule::When::At { at } => format!("at {}", at.0),
        };
        let next = s.next_at.map_or_else(|| "-".to_owned(), |n| n.to_string());
        println!(
            "{:<24} {:<24} {:<22} {:<10} {:<7} {:<15} {}",
            s.name,
            s.definition,
            when,
            s.missed.as_str(),
            s.paused,
            next,
            s.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// What a saga is started with, by `start` and by `schedule set`.
#[derive(clap::Args)]
pub(crate) struct SagaArgs {
    /// Definition name.
    #[arg(long)]
    definition: String,
    /// The saga's input, as JSON.
    #[arg(long)]
    input: String,
    /// Definition version (the newest when absent).
    #[arg(long)]
    version: Option<u32>,
    /// The saga's priority (higher first, default 0): its steps waiting for a resource slot
    /// take one before those of sagas with a lower priority.
    #[arg(long, allow_negative_numbers = true)]
    priority: Option<i32>,
}

/// The arguments of `start`.
#[derive(clap::Args)]
pub struct StartArgs {
    /// The saga.
    #[command(flatten)]
    saga: SagaArgs,
    /// The same key twice starts one saga.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `list`.
#[derive(clap::Args)]
pub struct ListArgs {
    /// Only this status.
    #[arg(long)]
    status: Option<String>,
    /// Only this definition.
    #[arg(long)]
    definition: Option<String>,
    /// Only sagas found by this search key: `name=value` (`order_id=o-42`).
    #[arg(long, value_name = "NAME=VALUE")]
    key: Option<String>,
    /// Page size.
    #[arg(long, default_value_t = 50)]
    limit: u32,
    /// The `next_cursor` of the previous page.
    #[arg(long)]
    cursor: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `wait`.
#[derive(clap::Args)]
pub struct WaitArgs {
    /// The saga's id.
    id: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `signal`.
#[derive(clap::Args)]
pub struct SignalArgs {
    /// The saga's id.
    id: String,
    /// The event's name.
    event: String,
    /// What it carries, as JSON.
    #[arg(long, default_value = "null")]
    payload: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `abort`.
#[derive(clap::Args)]
pub struct AbortArgs {
    /// The saga's id.
    id: String,
    /// Why (recorded as the failure message).
    #[arg(long)]
    reason: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `bulk`.
#[derive(clap::Args)]
pub struct BulkArgs {
    /// The action: abort, retry, skip or resume.
    action: String,
    /// Only sagas in this status.
    #[arg(long)]
    status: Option<String>,
    /// Only sagas of this definition.
    #[arg(long)]
    definition: Option<String>,
    /// Only sagas stopped with this stop code (compensation_failed, step_failed_after_pivot, timed_out).
    #[arg(long)]
    stop_code: Option<String>,
    /// Why (for abort: recorded as the failure message).
    #[arg(long)]
    reason: Option<String>,
    /// Apply it, confirming the count the preview printed; without it, only preview.
    #[arg(long, value_name = "COUNT")]
    yes: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The arguments of `versions`.
#[derive(clap::Args)]
pub struct VersionsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn id(s: &str) -> Result<SagaId, OpsError> {
    s.parse().map_err(|_| OpsError::new(ErrorKind::InvalidRequest, format!("`{s}` is not a saga id (a UUID)")))
}

fn json_arg(what: &str, s: &str) -> Result<Value, OpsError> {
    serde_json::from_str(s).map_err(|e| OpsError::new(ErrorKind::InvalidRequest, format!("{what} is not JSON: {e}")))
}

pub(crate) async fn run(mut config: Config, registry: Registry, cmd: Command) -> anyhow::Result<()> {
    config.api_addr = String::new();
    let node = Orchestrator::connect(config, registry).await?;
    let engine = node.engine();
    let out = match cmd {
        Command::Start(a) => {
            let req = StartRequest {
                definition: a.saga.definition,
                version: a.saga.version,
                input: json_arg("--input", &a.saga.input)?,
                idempotency_key: a.idempotency_key,
                saga_id: None,
                priority: a.saga.priority,
            };
            let started = engine.start(&req, None).await.map_err(OpsError::from)?;
            if a.json {
                println!("{}", serde_json::json!({"saga_id": started.saga_id, "created": started.created}));
            } else {
                println!("{} {}", started.saga_id, if started.created { "started" } else { "already existed (same idempotency key)" });
            }
            return Ok(());
        }
        Command::Show(a) => (ops::get(engine, id(&a.id)?).await?, a.json),
        Command::List(a) => {
            let (key, value) = match a.key.as_deref().map(|k| k.split_once('=')) {
                None => (None, None),
                Some(Some((k, v))) => (Some(k.to_owned()), Some(v.to_owned())),
                Some(None) => return Err(OpsError::new(ErrorKind::InvalidRequest, "--key takes name=value").into()),
            };
            let f = ListFilter {
                status: a.status,
                definition: a.definition,
                key,
                value,
                limit: Some(a.limit),
                cursor: a.cursor,
                ..ListFilter::default()
            };
            let page = ops::list(engine.pool(), &f).await?;
            return print_list(&page, a.json);
        }
        Command::Wait(a) => {
            let (v, settled) = ops::wait(engine, id(&a.id)?, Duration::from_secs(a.timeout_s)).await?;
            print_view(&v, a.json)?;
            if !settled {
                eprintln!("sagaflow: saga {} is still {} after {} s", v.id, v.status, a.timeout_s);
                std::process::exit(2);
            }
            return Ok(());
        }
        Command::Signal(a) => {
            let payload = json_arg("--payload", &a.payload)?;
            (ops::act(engine, id(&a.id)?, Input::Event { name: a.event, payload }).await?, a.json)
        }
        Command::Abort(a) => {
            let reason = a.reason.unwrap_or_else(|| ops::ABORTED_BY_AN_OPERATOR.into());
            (ops::act(engine, id(&a.id)?, Input::Operator(OperatorCommand::Abort { reason })).await?, a.json)
        }
        Command::Retry(a) => (ops::act(engine, id(&a.id)?, Input::Operator(OperatorCommand::RetryCompensation)).await?, a.json),
        Command::Skip(a) => (ops::act(engine, id(&a.id)?, Input::Operator(OperatorCommand::SkipCompensation)).await?, a.json),
        Command::Resume(a) => (ops::act(engine, id(&a.id)?, Input::Operator(OperatorCommand::Resume)).await?, a.json),
        Command::Versions(a) => {
            let all = ops::versions(engine.pool(), engine.registry()).await?;
            return print_versions(&all, a.json);
        }
        Command::Schedule(c) => return schedule_command(engine, c).await,
        Command::Bulk(a) => {
            let f = ops::BulkFilter { status: a.status, definition: a.definition, stop_code: a.stop_code, ..ops::BulkFilter::default() };
            let out = match a.yes {
                None => ops::bulk_preview(engine.pool(), &a.action, &f).await?,
                Some(n) => ops::bulk_apply(engine, &a.action, a.reason, &f, n).await?,
            };
            if a.json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else if a.yes.is_none() {
                println!("bulk {}: {} sagas match; to apply: the same command with --yes {}", a.action, out.matched, out.matched);
            } else {
                println!("bulk {}: {} matched, {} applied, {} refused", a.action, out.matched, out.applied, out.refused.len());
                for r in &out.refused {
                    println!("  {}: {}: {}", r.id, r.code, r.message);
                }
            }
            return Ok(());
        }
        Command::Serve | Command::Migrate => unreachable!("handled by the caller"),
    };
    print_view(&out.0, out.1)
}

fn print_list(page: &ops::Page, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(page)?);
        return Ok(());
    }
    println!("{:<36}  {:<24}  {:<12}  {:>15}", "SAGA", "DEFINITION", "STATUS", "AGE");
    let now = sagas::Timestamp::now().0;
    for s in &page.items {
        println!(
            "{:<36}  {:<24}  {:<12}  {:>15}",
            s.id,
            format!("{} v{}", s.definition, s.version),
            s.status,
            age(now.saturating_sub(s.created_at))
        );
    }
    if let Some(c) = &page.next_cursor {
        println!("more: --cursor {c}");
    }
    Ok(())
}

fn print_versions(all: &[ops::VersionUse], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(all)?);
        return Ok(());
    }
    println!("{:<24}  {:>7}  {:<6}  {:>8}  {:>8}  NOTE", "DEFINITION", "VERSION", "SERVED", "OPEN", "TOTAL");
    for v in all {
        let note = match (v.served, v.retirable(all), v.open) {
            (false, _, n) if n > 0 => "open sagas wait for a node that serves this version",
            (true, true, _) => "no open sagas: a release may drop it",
            _ => "",
        };
        println!(
            "{:<24}  {:>7}  {:<6}  {:>8}  {:>8}  {note}",
            v.definition,
            v.version,
            if v.served { "yes" } else { "no" },
            v.open,
            v.total
        );
    }
    Ok(())
}

fn age(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn print_view(v: &SagaView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    println!("saga        {}", v.id);
    println!("definition  {} v{}", v.definition, v.version);
    println!("status      {}", v.status);
    if let Some(c) = &v.current {
        println!("at          {c}");
    }
    if let Some(f) = &v.failure {
        println!("failure     {}: {}", f["code"].as_str().unwrap_or(""), f["message"].as_str().unwrap_or(""));
    }
    if let Some(s) = &v.stop {
        println!("stopped     {}: {}", s["code"].as_str().unwrap_or(""), s["message"].as_str().unwrap_or(""));
    }
    if !v.pending_compensations.is_empty() {
        println!("to undo     {}", v.pending_compensations.join(", "));
    }
    if let Some(p) = &v.parent {
        println!("parent      {} ({} step {}, attempt {})", p.saga_id, p.definition, p.step, p.attempt);
    }
    for s in &v.steps {
        for c in &s.children {
            println!("child       {} ({} step {}, attempt {}): {}", c.saga_id, v.definition, s.name, c.attempt, c.status);
        }
    }
    println!();
    println!("{:<24}  {:<22}  {:>8}  {:>13}  ERROR", "STEP", "STATUS", "ATTEMPTS", "COMPENSATIONS");
    for s in &v.steps {
        println!(
            "{:<24}  {:<22}  {:>8}  {:>13}  {}",
            s.name,
            s.status,
            s.attempts,
            s.compensation_attempts,
            s.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(())
}
