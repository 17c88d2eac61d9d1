//! Chat template tests: the fixture chat_template.jinja (SmolLM2's) renders the reference chat
//! (tests/fixtures/tokenizer_ref.json, from transformers' apply_chat_template) exactly; SmolLM2's
//! and Llama-3's templates render every conversation of tests/fixtures/chat_templates.json
//! (transformers' output: system messages, multi-turn, with and without the generation prompt)
//! exactly, with the SmolLM2 ids; and the Jinja details transformers relies on behave as in
//! Jinja2.

use qlora_webgpu::data::{ChatContext, ChatTemplate, Message, Tokenizer};
use qlora_webgpu::Error;
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{rel}")).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn reference() -> Value {
    serde_json::from_slice(&read("tokenizer_ref.json")).unwrap()
}

fn smol_template() -> ChatTemplate {
    ChatTemplate::from_jinja_bytes(&read("tiny-llama/model/chat_template.jinja")).unwrap()
}

fn ctx() -> ChatContext {
    ChatContext::from_tokenizer_config(&read("tiny-llama/model/tokenizer_config.json")).unwrap()
}

#[test]
fn renders_reference_chat_exactly() {
    let r = reference();
    let messages: Vec<Message> = serde_json::from_value(r["chat"]["messages"].clone()).unwrap();
    let want = r["chat"]["templated_text"].as_str().unwrap();
    let t = smol_template();
    assert_eq!(t.render(&messages, true, &ctx()).unwrap(), want);
    // The GGUF's copy of the template renders the same.
    let g = ChatTemplate::new(r["gguf"]["tokenizer.chat_template"].as_str().unwrap()).unwrap();
    assert_eq!(g.render(&messages, true, &ctx()).unwrap(), want);
}

#[test]
fn rendered_reference_chat_tokenizes_to_prompt_ids() {
    let r = reference();
    let tok = Tokenizer::from_hf_files(
        &read("tiny-llama/model/tokenizer.json"),
        Some(&read("tiny-llama/model/tokenizer_config.json")),
    )
    .unwrap();
    let messages: Vec<Message> = serde_json::from_value(r["chat"]["messages"].clone()).unwrap();
    let text = smol_template().render(&messages, true, &ChatContext::from_tokenizer(&tok)).unwrap();
    let want: Vec<u32> =
        r["chat"]["prompt_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(tok.encode(&text, false).unwrap(), want);
}

/// transformers' renderings (tests/fixtures/chat_templates.json, copied from
/// ../shared/reference): three conversations (user only; system + multi-turn with an assistant
/// turn that has surrounding spaces; multi-turn without system) x with / without the generation
/// prompt x SmolLM2's template (the fixture's chat_template.jinja) and Llama-3's instruct
/// template (its text is in the file), rendered with the SmolLM2 tokenizer's bos; each text and
/// its SmolLM2 ids (add_special_tokens=False) must match exactly.
#[test]
fn renders_every_reference_conversation_exactly() {
    let r: Value = serde_json::from_slice(&read("chat_templates.json")).unwrap();
    let tok = Tokenizer::from_hf_files(
        &read("tiny-llama/model/tokenizer.json"),
        Some(&read("tiny-llama/model/tokenizer_config.json")),
    )
    .unwrap();
    let c = ctx();
    assert_eq!(c.bos_token.as_deref(), r["bos_token"].as_str(), "the reference used the SmolLM2 bos");
    let llama3 = ChatTemplate::new(r["templates"]["llama3"].as_str().unwrap()).unwrap();
    let smol = smol_template();
    let cases = r["cases"].as_object().unwrap();
    assert_eq!(cases.len(), 12, "3 conversations x 2 settings x 2 templates");
    let mut seen = std::collections::BTreeSet::new();
    for (name, case) in cases {
        let (tname, rest) = name.split_once('/').unwrap();
        let t = match tname {
            "smollm2" => &smol,
            "llama3" => &llama3,
            other => panic!("{name}: unknown template {other}"),
        };
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        assert!(rest.ends_with(&format!("gen={}", if gen { "True" } else { "False" })), "{name}");
        let want = case["text"].as_str().unwrap();
        let got = t.render(&messages, gen, &c).unwrap();
        assert_eq!(got, want, "{name}: rendering differs from transformers'");
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(&got, false).unwrap(), ids, "{name}: SmolLM2 ids differ");
        seen.insert((tname.to_string(), rest.rsplit_once('/').unwrap().0.to_string(), gen));
    }
    assert_eq!(seen.len(), 12);
}

#[test]
fn tokenizer_config_template_string_or_named_list() {
    let src = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}";
    let cfg = json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>", "chat_template": src});
    let bytes = serde_json::to_vec(&cfg).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&bytes).unwrap().unwrap();
    let c = ChatContext::from_tokenizer_config(&bytes).unwrap();
    assert_eq!(c.bos_token.as_deref(), Some("<s>"));
    assert_eq!(c.eos_token.as_deref(), Some("</s>"));
    assert_eq!(t.render(&[Message::new("user", "x")], false, &c).unwrap(), "<s>[user]x");

    let list = json!({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT{{ messages|length }}"},
    ]});
    let bytes = serde_json::to_vec(&list).unwrap();
    let t = ChatTemplate::from_tokenizer_config(&bytes).unwrap().unwrap();
    assert_eq!(t.render(&[Message::new("user", "x")], false, &ChatContext::default()).unwrap(), "DEFAULT1");
    let t = ChatTemplate::from_tokenizer_config_named(&bytes, Some("tool_use")).unwrap().unwrap();
    assert_eq!(t.render(&[], false, &ChatContext::default()).unwrap(), "TOOLS");
    let no_default = json!({"chat_template": [{"name": "a", "template": "A"}]});
    assert!(ChatTemplate::from_tokenizer_config(&serde_json::to_vec(&no_default).unwrap()).is_err());
    assert!(ChatTemplate::from_tokenizer_config(b"{}").unwrap().is_none());
    // The fixture's tokenizer_config.json has no template (it lives in chat_template.jinja).
    assert!(ChatTemplate::from_tokenizer_config(&read("tiny-llama/model/tokenizer_config.json"))
        .unwrap()
        .is_none());
}

#[test]
fn trim_and_lstrip_blocks_and_trailing_newline() {
    // Jinja2 with trim_blocks + lstrip_blocks: a block tag's line leaves no whitespace behind;
    // the template's single trailing newline is dropped (keep_trailing_newline = False).
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\nEND\n";
    let t = ChatTemplate::new(src).unwrap();
    let m = [Message::new("user", "a"), Message::new("assistant", "b")];
    assert_eq!(t.render(&m, false, &ChatContext::default()).unwrap(), "U:a\nEND");
}

#[test]
fn raise_exception_fails_with_message() {
    let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}ok";
    let t = ChatTemplate::new(src).unwrap();
    assert_eq!(t.render(&[Message::new("user", "x")], false, &ChatContext::default()).unwrap(), "ok");
    match t.render(&[Message::new("assistant", "x")], false, &ChatContext::default()) {
        Err(Error::Invalid(msg)) => assert!(msg.contains("roles must alternate"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn tojson_writes_python_json() {
    let src = "{{ x|tojson }}|{{ x|tojson(indent=2) }}|{{ y|tojson }}|{{ x|tojson(sort_keys=true, separators=(',', ':')) }}";
    let t = ChatTemplate::new(src).unwrap();
    let mut c = ChatContext::default();
    c.extra.insert("x".into(), json!({"b": 1, "a": [1.5, true, null, "é<&>\"\n"], "c": {}}));
    c.extra.insert("y".into(), json!([1e-5, 100.0, 3]));
    let out = t.render(&[], false, &c).unwrap();
    let parts: Vec<&str> = out.split('|').collect();
    // serde_json's map without preserve_order sorts keys: a, b, c (the template sees that order).
    assert_eq!(parts[0], r#"{"a": [1.5, true, null, "é<&>\"\n"], "b": 1, "c": {}}"#);
    assert_eq!(
        parts[1],
        "{\n  \"a\": [\n    1.5,\n    true,\n    null,\n    \"é<&>\\\"\\n\"\n  ],\n  \"b\": 1,\n  \"c\": {}\n}"
    );
    assert_eq!(parts[2], "[1e-05, 100.0, 3]");
    assert_eq!(parts[3], r#"{"a":[1.5,true,null,"é<&>\"\n"],"b":1,"c":{}}"#);
    // Message fields keep their order (role, content).
    let t = ChatTemplate::new("{{ messages|tojson }}").unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "hi")], false, &ChatContext::default()).unwrap(),
        r#"[{"role": "user", "content": "hi"}]"#
    );
}

#[test]
fn loop_controls_python_methods_and_generation_blocks() {
    let src = "{%- for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}\
               {% if m.role == 'system' %}{% continue %}{% endif %}\
               {%- generation %}<{{ m.content.strip().upper() }}>{% endgeneration %}\
               {%- endfor %}{{ tools is none }}{{ documents is none }}";
    let t = ChatTemplate::new(src).unwrap();
    let m =
        [Message::new("system", "s"), Message::new("user", "  hello "), Message::new("assistant", "never")];
    assert_eq!(t.render(&m, false, &ChatContext::default()).unwrap(), "<HELLO>TrueTrue");
}

#[test]
fn syntax_error_is_a_format_error() {
    match ChatTemplate::new("{% for m in messages %}") {
        Err(Error::Format { file, .. }) => assert_eq!(file, "chat template"),
        other => panic!("{other:?}"),
    }
}
