//! The reference of every flag and every TOML key (`docs/REFERENCE.md`),
//! generated from clap's definition of the commands and from the config
//! file's schema, so that it cannot fall behind either: a test compares the
//! committed file with what this makes.

use std::fmt::Write as _;

use serde_json::Value;

/// The whole reference of `cli` (the `wasmgate` command), as Markdown.
pub(super) fn markdown(mut cli: clap::Command) -> String {
    let mut out = String::from(
        "# Reference: every flag and every config key\n\n\
         Generated from the code (`src/cli/reference.rs`); a test fails when it differs.\n\
         Regenerate with `WASMGATE_BLESS=1 cargo test --test all docs::the_reference`.\n\
         The [guide](GUIDE.md) explains them in context.\n",
    );
    // Settles every argument's arity and value names, as parsing would.
    cli.build();
    out.push_str("\n## `wasmgate` (serving)\n\n");
    out.push_str("`wasmgate [FLAGS]` serves; with `--config FILE` the listeners come from the file.\n\n");
    flags(&mut out, &cli);
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let _ = write!(out, "\n## `wasmgate {}`\n\n", sub.get_name());
        if let Some(about) = sub.get_about() {
            let _ = writeln!(out, "{}\n", one_line(&about.to_string()));
        }
        flags(&mut out, sub);
    }
    keys(&mut out, &cli);
    out
}

/// One table of a command's arguments, in the order `--help` lists them.
fn flags(out: &mut String, command: &clap::Command) {
    out.push_str("| flag | default | meaning |\n|---|---|---|\n");
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.is_hide_set() || id == "help" || id == "version" {
            continue;
        }
        let _ = writeln!(
            out,
            "| `{}` | {} | {} |",
            cell(&usage(arg)),
            default_of(arg),
            cell(&one_line(&help_of(arg)))
        );
    }
}

fn usage(arg: &clap::Arg) -> String {
    let value = arg
        .get_value_names()
        .map(|names| names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
    match arg.get_long() {
        Some(long) if takes_value => format!("--{long} {value}"),
        Some(long) => format!("--{long}"),
        None => value,
    }
}

fn help_of(arg: &clap::Arg) -> String {
    let help = arg.get_long_help().or_else(|| arg.get_help()).map(ToString::to_string);
    let mut text = help.unwrap_or_default();
    let takes_value = arg.get_num_args().is_some_and(|n| n.takes_values());
    let possible = if takes_value {
        arg.get_possible_values()
    } else {
        Vec::new()
    };
    let values: Vec<String> = possible
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| format!("`{}`", v.get_name()))
        .collect();
    if !values.is_empty() && !text.contains('`') {
        let _ = write!(text, " (one of {})", values.join(", "));
    }
    text
}

fn default_of(arg: &clap::Arg) -> String {
    // A switch's `false` says nothing.
    if !arg.get_num_args().is_some_and(|n| n.takes_values()) {
        return String::new();
    }
    let defaults: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| format!("`{}`", v.to_string_lossy()))
        .collect();
    if defaults.is_empty() {
        String::new()
    } else {
        defaults.join(", ")
    }
}

/// The config file's tables, each with its keys.
fn keys(out: &mut String, cli: &clap::Command) {
    let schema = crate::config::schema();
    let defs = schema.get("$defs").cloned().unwrap_or(Value::Null);
    out.push_str(
        "\n## Config file keys (`--config FILE`)\n\n\
         A TOML file of `[[listener]]` tables, `[upstreams.NAME]` pools, and optional \
         `[state]` and `[metrics]`. Unknown keys are refused. A key with a flag takes \
         that flag's default and bounds.\n",
    );
    for (table, def) in [
        ("[[listener]]", "ListenerSection"),
        ("[upstreams.NAME]", "UpstreamSection"),
        ("[state]", "StateSection"),
        ("[metrics]", "MetricsSection"),
    ] {
        let Some(section) = defs.get(def) else { continue };
        let _ = write!(out, "\n### `{table}`\n\n");
        if let Some(about) = section.get("description").and_then(Value::as_str) {
            let _ = writeln!(out, "{}\n", one_line(about));
        }
        out.push_str("| key | type | flag | meaning |\n|---|---|---|---|\n");
        let required: Vec<&str> = section
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let Some(properties) = section.get("properties").and_then(Value::as_object) else {
            continue;
        };
        for (key, property) in properties {
            let mut kind = type_of(property);
            if required.contains(&key.as_str()) {
                kind.push_str(", required");
            }
            let flag = flag_for(cli, table, key).map_or_else(String::new, |f| format!("`{f}`"));
            let about = property.get("description").and_then(Value::as_str).unwrap_or("");
            let _ = writeln!(out, "| `{key}` | {kind} | {flag} | {} |", cell(&one_line(about)));
        }
    }
}

/// A key's type as TOML writes it.
fn type_of(property: &Value) -> String {
    let kinds: Vec<&str> = match property.get("type") {
        Some(Value::String(kind)) => vec![kind.as_str()],
        Some(Value::Array(kinds)) => kinds.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    match kinds.iter().find(|k| **k != "null") {
        Some(&"array") => {
            let item = property.get("items").map(type_of).unwrap_or_default();
            format!("array of {item}s")
        }
        Some(kind) => (*kind).to_string(),
        None => String::new(),
    }
}

/// The serving flag a key stands for, if any: the same name, or the same
/// name under the table's prefix (`[state] redis` is `--state-redis`).
fn flag_for(cli: &clap::Command, table: &str, key: &str) -> Option<String> {
    let key = key.replace('_', "-");
    let candidates: Vec<String> = match table {
        "[metrics]" => vec!["metrics".into()],
        "[upstreams.NAME]" if key == "endpoints" => vec!["upstream".into()],
        "[upstreams.NAME]" => Vec::new(),
        "[state]" => vec![
            format!("state-{key}"),
            format!("state-redis-{key}"),
            format!("state-{key}-ms"),
        ],
        _ => vec![key.clone(), format!("no-{key}")],
    };
    candidates.into_iter().find_map(|name| {
        cli.get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()))
            .map(|a| {
                format!(
                    "--{name}{}",
                    if a.get_num_args().is_some_and(|n| n.takes_values()) {
                        " …"
                    } else {
                        ""
                    }
                )
            })
    })
}

/// Help text on one line: clap's paragraphs joined.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Text that may sit in a table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}
