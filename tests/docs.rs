//! The documentation cannot rot. Three checks on `README.md`, `docs/*.md` and `benches/README.md`:
//!
//! 1. Every ```` ```sh ````, ```` ```bash ```` or ```` ```console ```` block that contains `curl`
//!    runs, in the order the page shows it, against live servers this test starts: `localhost:8080`
//!    becomes the test server's address, each page runs in one `bash` (`set -eo pipefail`) in a
//!    fresh folder of its own, and any failing command fails the test with its page and line. A
//!    block opts out only with `<!-- docs-test: skip (needs …) -->` right above it, naming the
//!    partner this test lacks; the test counts the blocks and `curl` calls that ran and asserts a
//!    floor, so it cannot pass by skipping.
//! 2. `docs/configuration.md`'s key table (rows `` | `section.key` | default | meaning | ``) names
//!    every key the code accepts, with the code's default (as `labelfool config` prints it), and
//!    no key the code does not know; every such row elsewhere must match too, and every
//!    `` `section.key` `` the docs mention must exist. `config/default.toml` sets the code's
//!    defaults wherever it sets a key.
//! 3. Every relative link points to a file (and heading) that exists; `README.md` ≤ 12 KB.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pages the checks cover, README first, relative to the repository root.
fn pages() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .map(|p| p.strip_prefix(root()).unwrap().to_path_buf())
        .collect();
    docs.sort();
    let mut all = vec![PathBuf::from("README.md")];
    all.extend(docs);
    all.push(PathBuf::from("benches/README.md"));
    all
}

fn read(rel: &Path) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{}: {e}", rel.display()))
}

// ---------------------------------------------------------------------------------------------
// 1. The curl examples
// ---------------------------------------------------------------------------------------------

/// A fenced shell block: its first content line (1-based), its lines, and the reason it is
/// skipped, if a marker says so.
struct Block {
    line: usize,
    lines: Vec<String>,
    skip: Option<String>,
}

fn shell_blocks(text: &str) -> Vec<Block> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if let Some(info) = t.strip_prefix("```") {
            let lang = info.split_whitespace().next().unwrap_or("");
            let start = i + 1;
            let mut end = start;
            while end < lines.len() && !lines[end].trim_start().starts_with("```") {
                end += 1;
            }
            if matches!(lang, "sh" | "bash" | "console") {
                let marker = lines[..i].iter().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim());
                let skip = marker.and_then(|m| m.strip_prefix("<!-- docs-test: skip")).map(|m| {
                    m.trim_end_matches("-->").trim().trim_start_matches('(').trim_end_matches(')').to_string()
                });
                let mut body: Vec<String> = lines[start..end].iter().map(|l| l.to_string()).collect();
                if lang == "console" {
                    // Commands follow a `$ ` prompt; other lines are their output.
                    body = body
                        .iter()
                        .map(|l| l.strip_prefix("$ ").map(str::to_string).unwrap_or_else(|| "# (output)".into()))
                        .collect();
                }
                out.push(Block { line: start + 1, lines: body, skip });
            }
            i = end + 1;
        } else {
            i += 1;
        }
    }
    out
}

/// The servers the examples talk to.
struct Servers {
    /// Keyless, on loopback as `scripts/run` starts it: the default model, the setup's Triton
    /// repository (EfficientNet-Lite2) and a remote target `prod`.
    main: Server,
    /// Started with an API key (`$LABELFOOL_API_KEY` in the blocks that use it).
    keyed: Server,
    key: String,
    /// The remote behind `remote:prod`: another LabelFool, speaking the Open Inference Protocol.
    _prod: Server,
}

fn start_servers() -> Servers {
    let prod = Server::start(&default_model_config(""));
    let repo = models_dir().join("triton-repo");
    let main = Server::start(&default_model_config(&format!(
        "[[repositories]]\npath = \"{}\"\n\n[[remotes]]\nname = \"prod\"\nurl = \"{}\"\nmodel = \"efficientnet-lite0\"\n",
        repo.display(),
        prod.base
    )));
    let key = format!("docs-{}", std::process::id());
    let keyed = Server::start_with_env(&default_model_config(""), &[("LABELFOOL_API_KEY", &key)]);
    Servers { main, keyed, key, _prod: prod }
}

/// What running one page's blocks did.
struct PageRun {
    blocks_run: usize,
    curls: usize,
    skipped: Vec<String>,
}

fn run_page(page: &Path, servers: &Servers) -> PageRun {
    let text = read(page);
    let mut script = String::from(
        "set -eo pipefail\n\
         curl() { echo >> \"$DOCS_TEST_CURLS\"; command curl \"$@\" || return $?; }\n\
         trap 'echo \"docs-test: failed at script line $LINENO\" >&2' ERR\n",
    );
    // Script line (1-based) → the page's line.
    let mut map: Vec<usize> = vec![0; script.lines().count()];
    let mut skipped = Vec::new();
    let mut blocks_run = 0;
    for b in shell_blocks(&text) {
        if !b.lines.iter().any(|l| l.contains("curl")) {
            continue;
        }
        if let Some(reason) = b.skip {
            assert!(
                reason.starts_with("needs "),
                "{}:{}: a skipped block must say which partner it needs: `<!-- docs-test: skip (needs …) -->`, got {reason:?}",
                page.display(),
                b.line
            );
            skipped.push(format!("{}:{} ({reason})", page.display(), b.line));
            continue;
        }
        let keyed = b.lines.iter().any(|l| l.contains("LABELFOOL_API_KEY"));
        let addr = if keyed { servers.keyed.addr } else { servers.main.addr }.to_string();
        script.push_str(&format!("echo >> \"$DOCS_TEST_BLOCKS\"  # {}:{}\n", page.display(), b.line));
        map.push(b.line);
        for (k, l) in b.lines.iter().enumerate() {
            script.push_str(&l.replace("localhost:8080", &addr).replace("127.0.0.1:8080", &addr));
            script.push('\n');
            map.push(b.line + k);
        }
        blocks_run += 1;
    }
    if blocks_run == 0 {
        return PageRun { blocks_run, curls: 0, skipped };
    }
    let dir = tempfile::tempdir().unwrap();
    let (blocks_file, curls_file) = (dir.path().join(".blocks"), dir.path().join(".curls"));
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(dir.path().join("script.sh"), &script).unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new("bash")
        .arg(dir.path().join("script.sh"))
        .current_dir(&work)
        .env("DOCS_TEST_BLOCKS", &blocks_file)
        .env("DOCS_TEST_CURLS", &curls_file)
        .env("LABELFOOL_API_KEY", &servers.key)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("bash");
    let started = Instant::now();
    let limit = Duration::from_secs(1800);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{}: the examples did not finish within {limit:?}", page.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let count = |p: &Path| std::fs::read_to_string(p).map(|s| s.lines().count()).unwrap_or(0);
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if !status.success() {
        let line = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("docs-test: failed at script line "))
            .filter_map(|n| n.trim().parse::<usize>().ok())
            .next_back()
            .and_then(|n| map.get(n - 1).copied());
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        let tail = |s: &str| s.chars().rev().take(3000).collect::<Vec<_>>().into_iter().rev().collect::<String>();
        panic!(
            "{}:{}: an example failed ({status}); block {} of the page's runnable blocks\n--- stderr ---\n{}\n--- stdout (tail) ---\n{}\n--- main server log (tail) ---\n{}",
            page.display(),
            line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()),
            count(&blocks_file),
            tail(&stderr),
            tail(&stdout),
            tail(&servers.main.log()),
        );
    }
    assert_eq!(count(&blocks_file), blocks_run, "{}: not every block ran", page.display());
    PageRun { blocks_run, curls: count(&curls_file), skipped }
}

#[test]
fn every_curl_example_runs_against_a_live_server() {
    let servers = start_servers();
    let (mut blocks, mut curls, mut skipped) = (0, 0, Vec::new());
    for page in pages() {
        let started = Instant::now();
        let run = run_page(&page, &servers);
        eprintln!(
            "docs: {}: {} blocks, {} curl calls, {} skipped ({:.0} s)",
            page.display(),
            run.blocks_run,
            run.curls,
            run.skipped.len(),
            started.elapsed().as_secs_f64()
        );
        blocks += run.blocks_run;
        curls += run.curls;
        skipped.extend(run.skipped);
    }
    eprintln!("docs: {blocks} blocks run, {curls} curl calls, {} skipped: {skipped:#?}", skipped.len());
    assert!(blocks >= 20, "only {blocks} example blocks ran");
    assert!(curls >= 60, "only {curls} curl calls ran");
    assert!(skipped.len() <= 3, "too many skipped blocks: {skipped:#?}");
}

// ---------------------------------------------------------------------------------------------
// 2. The configuration table against the code
// ---------------------------------------------------------------------------------------------

/// The smallest configuration `labelfool config` accepts, with one entry of each list so their
/// defaults print: everything else is the code's default.
const PROBE: &str = "[[models]]\nname = \"m\"\ndir = \"/m\"\n\n[[remotes]]\nname = \"r\"\nurl = \"http://127.0.0.1:9\"\nmodel = \"r\"\n\n[[repositories]]\npath = \"/r\"\n";
/// The keys `PROBE` sets: their documented "default" is a description, not compared.
const PROBE_SETS: &[&str] =
    &["models[].name", "models[].dir", "remotes[].name", "remotes[].url", "remotes[].model", "repositories[].path"];

fn labelfool_config(config: &str, env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("probe.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["config", "--config"]).arg(&path).current_dir(dir.path());
    for (k, _) in std::env::vars() {
        if k.starts_with("LABELFOOL_") && k != "LABELFOOL_CACHE" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The field names an "unknown field" error lists as expected.
fn expected_fields(out: &std::process::Output, what: &str) -> BTreeSet<String> {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown field"),
        "{what}: expected an unknown-field error, got: {err}"
    );
    let list = err.split("expected ").nth(1).unwrap().split(" for key").next().unwrap();
    list.split('`')
        .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .map(str::to_string)
        .collect()
}

/// Every key the code accepts (`section.key`, `list[].key`) with its default; `None` where it has
/// none (an optional key), from `labelfool config` itself.
fn code_keys() -> BTreeMap<String, Option<toml::Value>> {
    let out = labelfool_config(PROBE, &[]);
    assert!(out.status.success(), "labelfool config: {}", String::from_utf8_lossy(&out.stderr));
    let printed: toml::Table = toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let sections = expected_fields(&labelfool_config(PROBE, &[("LABELFOOL_DOCSPROBE__X", "1")]), "top level");
    let mut keys = BTreeMap::new();
    for section in sections {
        let (fields, values, name) = match printed.get(&section) {
            Some(toml::Value::Array(list)) => {
                let probe = PROBE.replacen(
                    &format!("[[{section}]]\n"),
                    &format!("[[{section}]]\nlabelfool_docs_probe = 1\n"),
                    1,
                );
                let fields = expected_fields(&labelfool_config(&probe, &[]), &section);
                let values = list.first().and_then(|v| v.as_table()).cloned().unwrap_or_default();
                (fields, values, format!("{section}[]"))
            }
            Some(toml::Value::Table(t)) => {
                let var = format!("LABELFOOL_{}__LABELFOOL_DOCS_PROBE", section.to_uppercase());
                (expected_fields(&labelfool_config(PROBE, &[(&var, "1")]), &section), t.clone(), section.clone())
            }
            other => panic!("section {section}: printed as {other:?}"),
        };
        for f in fields {
            let v = values.get(&f).cloned();
            keys.insert(format!("{name}.{f}"), v);
        }
    }
    keys
}

fn same(a: &toml::Value, b: &toml::Value) -> bool {
    use toml::Value::*;
    let num = |v: &toml::Value| match v {
        Integer(i) => Some(*i as f64),
        Float(f) => Some(*f),
        _ => None,
    };
    match (a, b) {
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q)),
        (Table(x), Table(y)) => x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w))),
        _ => match (num(a), num(b)) {
            (Some(p), Some(q)) => p == q,
            _ => a == b,
        },
    }
}

/// A table row's cells, split on unescaped `|`.
fn cells(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut prev = ' ';
    for c in line.trim().trim_start_matches('|').trim_end_matches('|').chars() {
        if c == '|' && prev != '\\' {
            out.push(String::new());
        } else {
            out.last_mut().unwrap().push(c);
        }
        prev = c;
    }
    out.into_iter().map(|c| c.trim().replace("\\|", "|")).collect()
}

/// `engine.rs`, `report.md`, …: file names, not keys.
const FILE_TYPES: &[&str] =
    &["rs", "md", "toml", "json", "py", "sh", "yaml", "png", "jpg", "npy", "pt", "csv", "txt", "sqlite3"];

fn is_key(s: &str) -> bool {
    let Some((section, key)) = s.split_once('.') else { return false };
    let section = section.trim_end_matches("[]");
    !section.is_empty()
        && !key.is_empty()
        && section.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The key rows of a page: `` | `section.key` | default | … `` → (line, key, default cell).
fn key_rows(text: &str) -> Vec<(usize, String, String)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim_start().starts_with("| `"))
        .filter_map(|(i, l)| {
            let c = cells(l);
            let key = c.first()?.strip_prefix('`')?.strip_suffix('`')?.to_string();
            (is_key(&key) && c.len() >= 3).then(|| (i + 1, key, c[1].clone()))
        })
        .collect()
}

fn check_row(
    page: &str,
    line: usize,
    key: &str,
    cell: &str,
    code: &BTreeMap<String, Option<toml::Value>>,
) -> Result<(), String> {
    let Some(default) = code.get(key) else {
        return Err(format!("{page}:{line}: `{key}` is not a configuration key the code knows"));
    };
    if PROBE_SETS.contains(&key) {
        return Ok(());
    }
    let cell = cell.trim().trim_start_matches('`').trim_end_matches('`');
    match default {
        None if cell == "none" => Ok(()),
        None => Err(format!("{page}:{line}: `{key}` has no default in the code; the docs say {cell:?} (write `none`)")),
        Some(v) => match toml::from_str::<toml::Table>(&format!("v = {cell}")) {
            Ok(t) if same(&t["v"], v) => Ok(()),
            _ => Err(format!("{page}:{line}: `{key}` defaults to `{v}` in the code; the docs say {cell:?}")),
        },
    }
}

#[test]
fn configuration_docs_match_the_code() {
    let code = code_keys();
    assert!(code.len() > 60, "only {} keys found: {code:?}", code.len());
    let mut problems = Vec::new();

    // docs/configuration.md: complete and right.
    let page = "docs/configuration.md";
    let rows = key_rows(&read(Path::new(page)));
    let mut documented = BTreeSet::new();
    for (line, key, cell) in &rows {
        if !documented.insert(key.clone()) {
            problems.push(format!("{page}:{line}: `{key}` has two rows"));
        }
        if let Err(e) = check_row(page, *line, key, cell, &code) {
            problems.push(e);
        }
    }
    for (key, default) in &code {
        if !documented.contains(key) {
            let d = default.as_ref().map(|v| format!("`{v}`")).unwrap_or_else(|| "none".into());
            problems.push(format!("{page}: no row for `{key}` (default {d})"));
        }
    }

    // Every other page: its key rows right, and every `section.key` it names real.
    let sections: BTreeSet<String> =
        code.keys().map(|k| k.split('.').next().unwrap().trim_end_matches("[]").to_string()).collect();
    for p in pages() {
        let text = read(&p);
        let name = p.display().to_string();
        if name != page {
            for (line, key, cell) in key_rows(&text) {
                if let Err(e) = check_row(&name, line, &key, &cell, &code) {
                    problems.push(e);
                }
            }
        }
        for (i, l) in text.lines().enumerate() {
            for token in l.split('`').skip(1).step_by(2) {
                let bare = token.split_once(" = ").map(|(k, _)| k).unwrap_or(token);
                let file = bare.rsplit('.').next().is_some_and(|x| FILE_TYPES.contains(&x));
                if is_key(bare)
                    && !file
                    && sections.contains(bare.split('.').next().unwrap().trim_end_matches("[]"))
                    && !code.contains_key(bare)
                    && !code.contains_key(&bare.replacen('.', "[].", 1))
                {
                    problems.push(format!("{name}:{}: `{bare}` is not a configuration key", i + 1));
                }
            }
        }
    }

    // config/default.toml: the code's defaults wherever it sets a key (its [[models]] are the
    // configuration it ships, not defaults).
    let file: toml::Table = toml::from_str(&read(Path::new("config/default.toml"))).unwrap();
    for (section, v) in &file {
        let Some(t) = v.as_table() else { continue };
        for (k, value) in t {
            let key = format!("{section}.{k}");
            match code.get(&key) {
                None => problems.push(format!("config/default.toml: `{key}` is not a key the code knows")),
                Some(None) => {}
                Some(Some(d)) if same(d, value) => {}
                Some(Some(d)) => {
                    problems.push(format!("config/default.toml: `{key}` = {value} but the code's default is {d}"))
                }
            }
        }
    }
    assert!(problems.is_empty(), "the configuration docs drifted from the code:\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// 3. Links and size
// ---------------------------------------------------------------------------------------------

/// GitHub's anchor for a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for l in text.lines() {
        if l.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && l.starts_with('#') {
            out.insert(slug(l.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn links_resolve_and_the_readme_is_short() {
    let readme = std::fs::metadata(root().join("README.md")).unwrap().len();
    assert!(readme <= 12 * 1024, "README.md is {readme} bytes; at most 12 KiB");
    let mut broken = Vec::new();
    let mut checked = 0;
    for p in pages() {
        let text = read(&p);
        let mut fenced = false;
        for (i, l) in text.lines().enumerate() {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                continue;
            }
            if fenced {
                continue;
            }
            for part in l.split("](").skip(1) {
                let Some(target) = part.split(')').next() else { continue };
                let target = target.split_whitespace().next().unwrap_or("");
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (file, anchor) = target.split_once('#').map(|(f, a)| (f, Some(a))).unwrap_or((target, None));
                let resolved =
                    if file.is_empty() { root().join(&p) } else { root().join(p.parent().unwrap()).join(file) };
                if !resolved.exists() {
                    broken.push(format!("{}:{}: {target} (no such file)", p.display(), i + 1));
                    continue;
                }
                if let Some(a) = anchor
                    && resolved.extension().is_some_and(|x| x == "md")
                    && !anchors(&std::fs::read_to_string(&resolved).unwrap()).contains(a)
                {
                    broken.push(format!("{}:{}: {target} (no such heading)", p.display(), i + 1));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(checked >= 20, "only {checked} links checked");
}
