//! `qlora chat` driven through its standard input on the tiny reference Llama (its chat template
//! is SmolLM2's): two turns with PEFT's dev adapter (the second prompt carries the first
//! exchange), `/adapter base`, `/reset`, the first question again; the first and last answers
//! equal `qlora generate`'s for the same single question with and without the adapter, and a
//! small `--ctx-len` drops the earliest exchange.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn qlora(args: &[&str], stdin: &str) -> (String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qlora"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qlora");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(out.status.success(), "qlora {args:?} failed:\n{e}");
    (o, e)
}

/// The prompt-token counts of the answered turns, from the status lines on stderr.
fn prompt_tokens(err: &str) -> Vec<usize> {
    err.lines().filter_map(|l| l.strip_prefix('[')?.split_once(" prompt tokens")?.0.parse().ok()).collect()
}

#[test]
fn chat_through_stdin_with_an_adapter_switch_and_reset() {
    let model = fixtures().join("tiny-llama/model");
    let adapter = fixtures().join("tiny-llama/dev/adapter_final");
    let (m, a) = (model.to_str().unwrap(), adapter.to_str().unwrap());
    let spec = format!("pirate={a}");
    let q1 = "Hello there";
    let script = format!("{q1}\nWhat is two plus two?\n/adapter nosuch\n/adapter base\n/reset\n{q1}\n/exit\nnever read\n");
    let (out, err) = qlora(&["chat", m, "--adapter", &spec, "--max-new-tokens", "8"], &script);
    eprintln!("stdout:\n{out}\nstderr:\n{err}");
    let with = qlora(&["generate", m, "--adapter", a, "--prompt", q1, "--max-new-tokens", "8"], "").0;
    let without = qlora(&["generate", m, "--prompt", q1, "--max-new-tokens", "8"], "").0;
    assert_ne!(with, without, "the adapter changes the answer");
    assert!(out.starts_with(&with), "turn 1 (adapter pirate) = qlora generate --adapter:\n{out:?}\nvs {with:?}");
    assert!(out.ends_with(&without), "after /adapter base and /reset = qlora generate without adapter:\n{out:?}\nvs {without:?}");
    let p = prompt_tokens(&err);
    assert_eq!(p.len(), 3, "three answers, nothing after /exit: {err}");
    assert!(p[1] > p[0] + 8, "turn 2 carries turn 1's exchange: {p:?}");
    assert_eq!(p[2], p[0], "/reset forgets the conversation: {p:?}");
    assert!(err.contains("no adapter named \"nosuch\" (loaded: pirate)"), "{err}");
    assert!(err.contains("[now answering with the base model]"), "{err}");

    // A context too small for both exchanges: the first is dropped for the second question.
    let (_, err) = qlora(&["chat", m, "--max-new-tokens", "8", "--ctx-len", &(p[0] + 16).to_string()], "Hello there\nWhat is two plus two?\n");
    let q = prompt_tokens(&err);
    assert!(err.contains("[dropped the 1 earliest exchange(s) to stay within"), "{err}");
    assert!(q.len() == 2 && q[1] + 8 <= p[0] + 16, "{q:?}");
}
