//! Every command in the docs runs. The ```sh blocks of README.md, docs/ and compose/README.md
//! are either run here, as written, by bash against real RabbitMQ and PostgreSQL, or run by CI:
//! a command counts as run by CI when `.ci/run` (with `scripts/setup.sh` and `scripts/test`) or
//! `compose/smoke.sh` runs the same program with (at least) the same flags, so CI may use
//! smaller numbers than a long benchmark.
//!
//! Here `sagaflow` and `order-participant` are this build's binaries (`sagaflow-node`,
//! `testkit-order-participant`), `cargo run -p sagaflow --` is `sagaflow`, `cargo build` of
//! those binaries is a no-op (`cargo test` built them), `python` is `SAGAFLOW_PYTHON`, and the
//! variables point at this test's database and namespace. A command in the foreground that
//! serves until stopped (`sagaflow serve`, a Python participant) gets a few seconds, then
//! SIGTERM, and must exit 0.

use std::path::{Path, PathBuf};
use std::time::Duration;

use testkit::TestEnv;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

/// The documents whose ```sh blocks are commands.
fn documents() -> Vec<PathBuf> {
    let root = root();
    let mut out = vec![root.join("README.md"), root.join("compose/README.md")];
    for dir in ["docs", "docs/errors"] {
        let mut md: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .expect("docs/")
            .map(|e| e.expect("a directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "md"))
            .collect();
        md.sort();
        out.extend(md);
    }
    out
}

struct Block {
    place: String,
    /// Command lines, continuation lines joined.
    lines: Vec<String>,
}

fn sh_blocks(path: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(path).expect("a document");
    let name = path.strip_prefix(root()).unwrap_or(path).display().to_string();
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    let mut pending = String::new();
    for (n, line) in text.lines().enumerate() {
        let fence = line.trim_start();
        if let Some(lang) = fence.strip_prefix("```") {
            // A fence closes the open block, or opens one (only `sh` blocks are kept; the lines
            // of another language's block are skipped because `current` stays empty).
            match current.take() {
                Some(b) => out.push(b),
                None if lang.trim() == "sh" => current = Some(Block { place: format!("{name}:{}", n + 1), lines: Vec::new() }),
                None => {}
            }
            continue;
        }
        if let Some(b) = current.as_mut() {
            let line = line.trim();
            if let Some(head) = line.strip_suffix('\\') {
                pending.push_str(head);
                pending.push(' ');
                continue;
            }
            pending.push_str(line);
            let full = std::mem::take(&mut pending);
            if !full.is_empty() && !full.starts_with('#') {
                b.lines.push(full);
            }
        }
    }
    out
}

/// A line without its trailing `# comment` (a `#` after whitespace, outside quotes).
fn strip_comment(line: &str) -> &str {
    let (mut single, mut double, mut prev_space) = (false, false, true);
    for (i, c) in line.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_space => return line[..i].trim_end(),
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// The simple commands of a line: split at `&&`, `||`, `|`, `;`, `&`, `$(` and `)`, leading
/// `VAR=value` assignments dropped, quoted strings kept whole (without their quotes).
fn simple_commands(line: &str) -> Vec<Vec<String>> {
    let mut commands = vec![Vec::new()];
    let (mut word, mut single, mut double) = (String::new(), false, false);
    // `$(...)` opens a new quoting context, even inside double quotes.
    let mut outer_double = Vec::new();
    let mut chars = strip_comment(line).chars().peekable();
    let end_word = |word: &mut String, commands: &mut Vec<Vec<String>>| {
        if !word.is_empty() {
            commands.last_mut().expect("one command").push(std::mem::take(word));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '$' if !single && chars.peek() == Some(&'(') => {
                chars.next();
                outer_double.push(double);
                double = false;
                end_word(&mut word, &mut commands);
                commands.push(Vec::new());
            }
            ')' if !single && !double => {
                double = outer_double.pop().unwrap_or(false);
                end_word(&mut word, &mut commands);
                commands.push(Vec::new());
            }
            '&' | '|' | ';' if !single && !double => {
                end_word(&mut word, &mut commands);
                commands.push(Vec::new());
            }
            c if c.is_whitespace() && !single && !double => end_word(&mut word, &mut commands),
            c => word.push(c),
        }
    }
    end_word(&mut word, &mut commands);
    commands
        .into_iter()
        .map(|words| words.into_iter().skip_while(|w| w.contains('=') && !w.starts_with('-')).collect::<Vec<_>>())
        .filter(|words| !words.is_empty())
        .collect()
}

/// Shell builtins and plain tools a block may use without it counting as a command to cover.
const NOT_COMMANDS: [&str; 7] = ["cd", "export", "kill", "wait", "jobs", "jq", "grep"];

/// The program of a command, with its subcommand for tools that have them (`cargo build`,
/// `docker-compose up`, `.../pip install`).
fn program(cmd: &[String]) -> Vec<&str> {
    let first = cmd[0].as_str();
    let tool = first.rsplit('/').next().unwrap_or(first);
    match cmd.get(1) {
        Some(sub) if ["cargo", "docker-compose", "docker", "pip"].contains(&tool) && !sub.starts_with('-') => vec![first, sub],
        _ => vec![first],
    }
}

/// CI runs `cmd` when a command in its scripts has the same program and every flag of `cmd`.
fn run_by_ci(cmd: &[String], ci: &[Vec<String>]) -> bool {
    ci.iter().any(|c| program(c) == program(cmd) && cmd.iter().filter(|w| w.starts_with('-')).all(|flag| c.contains(flag)))
}

/// Every simple command of CI's scripts.
fn ci_commands() -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for script in [".ci/run", "scripts/setup.sh", "scripts/test", "compose/smoke.sh"] {
        let text = std::fs::read_to_string(root().join(script)).expect("a CI script");
        for line in text.lines() {
            out.extend(simple_commands(line));
        }
    }
    out
}

const PRELUDE: &str = r#"
set -euo pipefail
trap 'for p in $(jobs -p); do kill -TERM "$p" 2>/dev/null || true; done; wait' EXIT
# In a background job, become the program so `kill $(jobs -p)` reaches it.
run_bin() { if [[ $BASHPID != "$$" ]]; then exec "$@"; fi; "$@"; }
# In the foreground, something that serves until stopped gets a few seconds, then SIGTERM.
serve_briefly() { timeout --preserve-status -s TERM 10 "$@"; }
sagaflow() {
    if [[ ${1:-} == serve && $BASHPID == "$$" ]]; then serve_briefly "$DOCS_SAGAFLOW" "$@"; return; fi
    run_bin "$DOCS_SAGAFLOW" "$@"
}
order-participant() { run_bin "$DOCS_ORDER_PARTICIPANT" "$@"; }
python() {
    if [[ $BASHPID == "$$" ]]; then serve_briefly "$SAGAFLOW_PYTHON" "$@"; return; fi
    run_bin "$SAGAFLOW_PYTHON" "$@"
}
cargo() {
    case "$*" in
        "run -p sagaflow -- "*) shift 4; sagaflow "$@" ;;
        "build -p sagaflow -p order-fulfilment") echo "docs test: built by cargo test" ;;
        *) echo "docs test: no stand-in for: cargo $*" >&2; return 97 ;;
    esac
}
"#;

/// The interpreter with the Python participant's packages: `SAGAFLOW_PYTHON`, else the venv
/// `scripts/setup.sh` makes.
fn python() -> String {
    std::env::var("SAGAFLOW_PYTHON").unwrap_or_else(|_| root().join("target/ci-venv/bin/python").display().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_the_docs_runs() {
    let env = TestEnv::start().await.unwrap();
    let ci = ci_commands();
    let runnable = ["sagaflow", "order-participant", "python", "cargo", "promtool"];
    let mut ran = Vec::new();
    let mut by_ci = Vec::new();
    let mut uncovered = Vec::new();
    let mut scripts = Vec::new();
    for doc in documents() {
        for block in sh_blocks(&doc) {
            let mut script = String::new();
            let mut runs_here = false;
            for line in &block.lines {
                let commands = simple_commands(line);
                let covered = commands.iter().all(|c| NOT_COMMANDS.contains(&c[0].as_str()) || run_by_ci(c, &ci));
                if covered && commands.iter().any(|c| !NOT_COMMANDS.contains(&c[0].as_str())) {
                    by_ci.push(format!("{}: {line}", block.place));
                    script.push_str(&format!(": run by CI: {}\n", line.replace(['\'', '"', '$', '`', '(', ')', '|', '&', ';'], " ")));
                    continue;
                }
                for c in &commands {
                    if !NOT_COMMANDS.contains(&c[0].as_str()) && !runnable.contains(&c[0].as_str()) && !run_by_ci(c, &ci) {
                        uncovered.push(format!("{}: `{}` is run neither here nor by CI", block.place, c.join(" ")));
                    }
                }
                runs_here |= commands.iter().any(|c| !NOT_COMMANDS.contains(&c[0].as_str()));
                script.push_str(line);
                script.push('\n');
            }
            if runs_here {
                scripts.push((block.place.clone(), script));
            }
        }
    }
    assert!(uncovered.is_empty(), "{}", uncovered.join("\n"));

    for (place, script) in scripts {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg("-c")
            .arg(format!("{PRELUDE}\n{script}"))
            .current_dir(root())
            .kill_on_drop(true)
            .env("DOCS_SAGAFLOW", env!("CARGO_BIN_EXE_sagaflow-node"))
            .env("DOCS_ORDER_PARTICIPANT", env!("CARGO_BIN_EXE_testkit-order-participant"))
            .env("SAGAFLOW_PYTHON", python())
            .env("RUST_LOG", "warn");
        // The test's database and namespace; the API on a free port.
        for (k, v) in env.node_env("docs") {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(240), cmd.output())
            .await
            .unwrap_or_else(|_| panic!("{place}: still running after 240 s"));
        let out = out.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{place} failed ({}):\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", out.status);
        ran.push(place);
    }
    println!("docs: ran {} blocks here: {}", ran.len(), ran.join(", "));
    println!("docs: run by CI:\n  {}", by_ci.join("\n  "));

    // Whatever the blocks started has settled, and the walkthroughs did what they say.
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM sagaflow.instances WHERE status NOT IN ('completed', 'compensated')")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(open, 0, "every saga the docs started settled");
    let walkthrough: Vec<(String, String)> = sqlx::query_as(
        "SELECT state->'data'->>'order_id', status FROM sagaflow.instances WHERE state->'data'->>'order_id' IN ('o-1', 'ops-1') ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(walkthrough, [("o-1".to_owned(), "completed".to_owned()), ("ops-1".to_owned(), "compensated".to_owned())]);
    env.cleanup(&order_fulfilment::PARTICIPANTS).await.unwrap();
}

#[test]
fn command_lines_split_into_simple_commands() {
    let cmds = simple_commands(r#"id=$(sagaflow start --json --input '{"a":"b c"}' | jq -r .saga_id)  # note"#);
    assert_eq!(cmds, [vec!["sagaflow", "start", "--json", "--input", r#"{"a":"b c"}"#], vec!["jq", "-r", ".saga_id"]]);
    let cmds = simple_commands(r#"id="$(curl -fsS -X POST "$api/sagas" -H "A: b" -d "$body" |"#);
    assert_eq!(cmds, [vec!["curl", "-fsS", "-X", "POST", "$api/sagas", "-H", "A: b", "-d", "$body"]]);
    let cmds = simple_commands("ORDER_EXAMPLE_STOCK=widget=1 order-participant inventory &");
    assert_eq!(cmds, [vec!["order-participant", "inventory"]]);
    let ci = simple_commands(
        "target/release/order-saga-3 --variant both --measure all --runs 1 --sagas 200 --nodes 1,2; cargo build --release -p bench",
    );
    assert!(run_by_ci(&simple_commands("cargo build --release -p bench")[0], &ci));
    assert!(!run_by_ci(&simple_commands("cargo run --release -p bench")[0], &ci), "another cargo subcommand");
    assert!(run_by_ci(&simple_commands("target/release/order-saga-3 --variant both --measure all --runs 3 --nodes 1,2")[0], &ci));
    assert!(!run_by_ci(&simple_commands("target/release/order-saga-3 --sustain-minutes 10")[0], &ci));
}

/// Every query of `monitoring/dashboard.json` is PromQL that Prometheus parses: written as
/// recording rules (`$__rate_interval` as `5m`) for `promtool check rules`, which parses each.
#[test]
fn the_dashboard_queries_parse() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("monitoring/dashboard.json")).unwrap()).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap().replace("$__rate_interval", "5m");
            rules.push_str(&format!("      - record: dashboard:query_{n}\n        expr: {}\n", serde_json::Value::from(expr)));
            n += 1;
        }
    }
    assert!(n >= 15, "{n} queries");
    let file = std::env::temp_dir().join(format!("sagaflow-dashboard-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("promtool (Debian's prometheus package; scripts/setup.sh installs it): {e}"));
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("SUCCESS: {n} rules found")));
}
