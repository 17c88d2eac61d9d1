//! The one parser of prompts given as JSON (`session::Prompt::from_json`), which the browser
//! package's `prompt` argument and `qlora train --prompts` lines both go through.

use qlora_webgpu::data::chat::Message;
use qlora_webgpu::session::Prompt;
use serde_json::json;

fn chat(p: Prompt) -> Vec<Message> {
    match p {
        Prompt::Chat(m) => m,
        Prompt::Raw(t) => panic!("expected chat messages, got raw text {t:?}"),
    }
}

fn raw(p: Prompt) -> String {
    match p {
        Prompt::Raw(t) => t,
        Prompt::Chat(m) => panic!("expected raw text, got messages {m:?}"),
    }
}

#[test]
fn every_json_form_gives_the_prompt_it_names() {
    // A string: one user message under a chat template, raw text without one.
    assert_eq!(chat(Prompt::from_json(&json!("Hi"), true).unwrap()), vec![Message::new("user", "Hi")]);
    assert_eq!(raw(Prompt::from_json(&json!("Hi"), false).unwrap()), "Hi");
    // Messages, bare or under "messages", kept as given.
    let msgs = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    let want = vec![Message::new("system", "Be brief."), Message::new("user", "Hi")];
    assert_eq!(chat(Prompt::from_json(&msgs, true).unwrap()), want);
    assert_eq!(chat(Prompt::from_json(&json!({ "messages": msgs }), false).unwrap()), want);
    // Raw text under "text" or "prompt" ("prompt" first when both are there).
    assert_eq!(raw(Prompt::from_json(&json!({"text": "Once"}), true).unwrap()), "Once");
    assert_eq!(raw(Prompt::from_json(&json!({"prompt": "Once", "text": "Twice"}), true).unwrap()), "Once");
}

#[test]
fn a_bad_prompt_says_what_was_expected() {
    for bad in [json!(3), json!({"content": "x"}), json!(null)] {
        let e = Prompt::from_json(&bad, true).unwrap_err();
        assert!(e.contains("expected a string, chat messages"), "{bad}: {e}");
    }
    let e = Prompt::from_json(&json!([{"role": "user"}]), true).unwrap_err();
    assert!(e.contains("messages must be [{role, content}, ...]") && e.contains("content"), "{e}");
}
