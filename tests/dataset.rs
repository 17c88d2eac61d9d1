//! Data sets: JSONL formats parsed and masked exactly (counted tokens decoded back to the text
//! the loss should cover) with the fixture tokenizer and chat template (SmolLM2's), bad lines
//! reported with file and line, truncation, batches (padding, shift, counts), seeded shuffling
//! that resumes exactly, and the validation split.

use qlora_webgpu::data::dataset::*;
use qlora_webgpu::data::{ChatTemplate, Message, Tokenizer};
use qlora_webgpu::Error;
use std::collections::BTreeSet;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{rel}")).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn tok() -> Tokenizer {
    Tokenizer::from_hf_files(&read("tiny-llama/model/tokenizer.json"), Some(&read("tiny-llama/model/tokenizer_config.json")))
        .unwrap()
}

fn template() -> ChatTemplate {
    ChatTemplate::from_jinja_bytes(&read("tiny-llama/model/chat_template.jinja")).unwrap()
}

fn load(name: &str, fmt: Format) -> Dataset {
    Dataset::from_jsonl(name, &read(&format!("data/{name}")), fmt).unwrap()
}

const IM_END: u32 = 2;

fn opts() -> EncodeOptions {
    EncodeOptions::default()
}

/// The maximal runs of counted tokens (label != -100), each decoded.
fn counted_runs(tok: &Tokenizer, ex: &Example) -> Vec<String> {
    assert_eq!(ex.ids.len(), ex.labels.len());
    let mut runs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (&id, &l) in ex.ids.iter().zip(&ex.labels) {
        if l == IGNORE {
            if !cur.is_empty() {
                runs.push(std::mem::take(&mut cur));
            }
        } else {
            assert_eq!(l, id as i32, "a counted label is its own id");
            cur.push(id);
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs.iter().map(|r| tok.decode(r, false).unwrap()).collect()
}

fn format_err(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(e @ Error::Format { .. }) => e.to_string(),
        other => panic!("expected a format error, got {other:?}"),
    }
}

// ---------------------------------------------------------------- formats and masks

#[test]
fn text_counts_everything_and_appends_eos() {
    let tok = tok();
    assert_eq!(tok.eos_id(), Some(IM_END));
    let ds = load("text.jsonl", Format::Auto);
    assert_eq!(ds.format(), Format::Text);
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.lines(), &[1, 3, 4], "the blank line 2 is skipped, lines stay 1-based");
    let tmpl = template();
    let enc = Encoder::new(&tok, Some(&tmpl), opts()).unwrap();
    let td = ds.tokenize(&enc).unwrap();
    for (rec, ex) in ds.records().iter().zip(td.examples()) {
        let Record::Text(text) = rec else { panic!("{rec:?}") };
        // SmolLM2 adds no bos to plain text; the eos is appended.
        let mut want = tok.encode(text, true).unwrap();
        assert_ne!(want.first(), Some(&1), "no <|im_start|> bos for text");
        want.push(IM_END);
        assert_eq!(ex.ids, want);
        assert_eq!(counted_runs(&tok, ex), vec![format!("{text}<|im_end|>")]);
    }
    // Without append_eos: exactly the tokenizer's ids, all counted.
    let enc = Encoder::new(&tok, None, EncodeOptions { append_eos: false, ..opts() }).unwrap();
    let td = ds.tokenize(&enc).unwrap();
    let Record::Text(t0) = &ds.records()[0] else { unreachable!() };
    assert_eq!(td.examples()[0].ids, tok.encode(t0, true).unwrap());
    assert!(td.examples()[0].labels.iter().zip(&td.examples()[0].ids).all(|(&l, &i)| l == i as i32));
}

#[test]
fn text_already_ending_in_eos_gets_no_second_one() {
    let tok = tok();
    let ds = Dataset::from_jsonl("t.jsonl", br#"{"text": "Done.<|im_end|>"}"#, Format::Text).unwrap();
    let td = ds.tokenize(&Encoder::new(&tok, None, opts()).unwrap()).unwrap();
    let ex = &td.examples()[0];
    assert_eq!(ex.ids, tok.encode("Done.<|im_end|>", true).unwrap());
    assert_eq!(ex.ids.iter().filter(|&&i| i == IM_END).count(), 1);
}

#[test]
fn prompt_completion_counts_completion_and_eos() {
    let tok = tok();
    let ds = load("prompt_completion.jsonl", Format::Auto);
    assert_eq!(ds.format(), Format::PromptCompletion);
    let td = ds.tokenize(&Encoder::new(&tok, Some(&template()), opts()).unwrap()).unwrap();
    let want_counted = [" Paris.<|im_end|>", "Guten Morgen<|im_end|>", "A completion with an empty prompt.<|im_end|>"];
    for ((rec, ex), want) in ds.records().iter().zip(td.examples()).zip(want_counted) {
        let Record::PromptCompletion { prompt, completion } = rec else { panic!("{rec:?}") };
        let mut ids = tok.encode(&format!("{prompt}{completion}"), true).unwrap();
        ids.push(IM_END);
        assert_eq!(ex.ids, ids);
        assert_eq!(counted_runs(&tok, ex), vec![want.to_string()]);
        // The prompt's tokens are exactly the uncounted head.
        let n_prompt = ex.labels.iter().take_while(|&&l| l == IGNORE).count();
        assert_eq!(tok.decode(&ex.ids[..n_prompt], false).unwrap(), *prompt);
    }
    // train_on_prompt counts everything.
    let td = ds.tokenize(&Encoder::new(&tok, None, EncodeOptions { train_on_prompt: true, ..opts() }).unwrap()).unwrap();
    for ex in td.examples() {
        assert!(ex.labels.iter().zip(&ex.ids).all(|(&l, &i)| l == i as i32));
    }
}

#[test]
fn prompt_ending_inside_a_word_counts_the_straddling_token() {
    let tok = tok();
    // "Ans" + "wer": whatever token covers the boundary is counted (bytes overlap the completion).
    let ds = Dataset::from_jsonl("p.jsonl", br#"{"prompt": "The Ans", "completion": "wer"}"#, Format::Auto).unwrap();
    let td = ds.tokenize(&Encoder::new(&tok, None, opts()).unwrap()).unwrap();
    let ex = &td.examples()[0];
    let runs = counted_runs(&tok, ex);
    assert_eq!(runs.len(), 1);
    assert!(runs[0].ends_with("wer<|im_end|>") && "The Answer<|im_end|>".ends_with(&runs[0]), "{runs:?}");
}

#[test]
fn chat_counts_assistant_content_and_im_end() {
    let tok = tok();
    let tmpl = template();
    let ds = load("chat.jsonl", Format::Auto);
    assert_eq!(ds.format(), Format::Messages);
    let td = ds.tokenize(&Encoder::new(&tok, Some(&tmpl), opts()).unwrap()).unwrap();
    let want: [&[&str]; 3] = [
        &["2 + 3 = 5.<|im_end|>"],
        &["Blue.<|im_end|>", "Green.<|im_end|>"],
        &["Hi!\nHow can I help?<|im_end|>"],
    ];
    let ctx = qlora_webgpu::data::ChatContext::from_tokenizer(&tok);
    for ((rec, ex), want) in ds.records().iter().zip(td.examples()).zip(want) {
        let Record::Messages(m) = rec else { panic!("{rec:?}") };
        // The ids are the whole rendered conversation, tokenized without added specials.
        let text = tmpl.render(m, false, &ctx).unwrap();
        assert_eq!(ex.ids, tok.encode(&text, false).unwrap());
        assert_eq!(counted_runs(&tok, ex), want.to_vec());
        // No eos appended: the conversation ends with the template's "<|im_end|>\n".
        assert_eq!(tok.decode(&ex.ids[ex.ids.len() - 2..], false).unwrap(), "<|im_end|>\n");
    }
    // The first example, position by position: everything up to "<|im_start|>assistant\n" is
    // masked, then the answer and <|im_end|>, then the final newline is masked.
    let ex = &td.examples()[0];
    let prompt = tmpl.render(&[Message::new("user", "What is 2 + 3?")], true, &ctx).unwrap();
    let n_prompt = tok.encode(&prompt, false).unwrap().len();
    assert!(ex.labels[..n_prompt].iter().all(|&l| l == IGNORE));
    let n_answer = tok.encode("2 + 3 = 5.", false).unwrap().len();
    assert!(ex.labels[n_prompt..n_prompt + n_answer + 1].iter().all(|&l| l != IGNORE));
    assert_eq!(ex.labels[n_prompt + n_answer], IM_END as i32);
    assert_eq!(ex.labels.len(), n_prompt + n_answer + 2);
    assert_eq!(ex.labels[n_prompt + n_answer + 1], IGNORE);

    // train_on_prompt: every token counts.
    let td = ds.tokenize(&Encoder::new(&tok, Some(&tmpl), EncodeOptions { train_on_prompt: true, ..opts() }).unwrap()).unwrap();
    for ex in td.examples() {
        assert!(ex.labels.iter().zip(&ex.ids).all(|(&l, &i)| l == i as i32));
    }
}

#[test]
fn chat_spans_with_other_templates() {
    let tok = tok();
    let rec = Record::Messages(vec![
        Message::new("user", "Hello"),
        Message::new("assistant", "  Hi there  "),
        Message::new("user", "Bye"),
        Message::new("assistant", "Bye!"),
    ]);
    // End of turn directly after the content, content trimmed by the template.
    let t = ChatTemplate::new(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let ex = Encoder::new(&tok, Some(&t), opts()).unwrap().encode(&rec).unwrap();
    assert_eq!(counted_runs(&tok, &ex), vec!["Hi there<|im_end|>", "Bye!<|im_end|>"]);
    // A plain-text template without special tokens: the whole suffix after the content counts.
    // The " Hi" token straddles the span's start (its space is the template's) and is counted.
    let plain = Record::Messages(vec![
        Message::new("user", "Hello"),
        Message::new("assistant", "Hi there"),
        Message::new("user", "Bye"),
        Message::new("assistant", "Bye!"),
    ]);
    let t = ChatTemplate::new(
        "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n\n{% endfor %}{% if add_generation_prompt %}### assistant: {% endif %}",
    )
    .unwrap();
    let ex = Encoder::new(&tok, Some(&t), opts()).unwrap().encode(&plain).unwrap();
    assert_eq!(counted_runs(&tok, &ex), vec![" Hi there\n\n", " Bye!\n\n"]);
    // A template whose generation prompt is not a prefix of the assistant turn: the content is
    // searched after the common prefix.
    let t = ChatTemplate::new(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}<|im_end|>{% endfor %}{% if add_generation_prompt %}<assistant><think></think>{% endif %}",
    )
    .unwrap();
    let ex = Encoder::new(&tok, Some(&t), opts()).unwrap().encode(&plain).unwrap();
    assert_eq!(counted_runs(&tok, &ex), vec!["Hi there<|im_end|>", "Bye!<|im_end|>"]);
    // A template that renders earlier turns differently once later ones exist is refused.
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<|im_start|>a\n(old)<|im_end|>{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endif %}{% endfor %}",
    )
    .unwrap();
    let err = Encoder::new(&tok, Some(&t), opts()).unwrap().encode(&rec).unwrap_err().to_string();
    assert!(err.contains("train_on_prompt"), "{err}");
    // With train_on_prompt the whole render counts, as the template wrote it (no eos appended:
    // the template ends the turn).
    let ex = Encoder::new(&tok, Some(&t), EncodeOptions { train_on_prompt: true, ..opts() }).unwrap().encode(&rec).unwrap();
    let text = "<|im_start|>user\nHello<|im_end|><|im_start|>a\n(old)<|im_end|>\
                <|im_start|>user\nBye<|im_end|><|im_start|>assistant\nBye!<|im_end|>";
    assert_eq!(tok.decode(&ex.ids, false).unwrap(), text);
    assert_eq!(ex.ids, tok.encode(text, false).unwrap());
    assert_eq!(ex.labels, ex.ids.iter().map(|&i| i as i32).collect::<Vec<_>>(), "every token counted");
    assert_eq!(counted_runs(&tok, &ex), vec![text]);
}

#[test]
fn alpaca_with_and_without_chat_template() {
    let tok = tok();
    let tmpl = template();
    let ds = load("alpaca.jsonl", Format::Auto);
    assert_eq!(ds.format(), Format::Alpaca);
    assert_eq!(
        ds.records()[2],
        Record::Alpaca { instruction: "Give a synonym of happy.".into(), input: String::new(), output: "Glad.".into() }
    );
    // With the template: a user turn "instruction\n\ninput" (or the instruction alone) and an
    // assistant turn with the output.
    let td = ds.tokenize(&Encoder::new(&tok, Some(&tmpl), opts()).unwrap()).unwrap();
    let ctx = qlora_webgpu::data::ChatContext::from_tokenizer(&tok);
    let users = ["Name the largest planet.", "Add the numbers.\n\n7 and 5", "Give a synonym of happy."];
    for ((rec, ex), user) in ds.records().iter().zip(td.examples()).zip(users) {
        let Record::Alpaca { output, .. } = rec else { unreachable!() };
        let m = [Message::new("user", user), Message::new("assistant", output.as_str())];
        assert_eq!(ex.ids, tok.encode(&tmpl.render(&m, false, &ctx).unwrap(), false).unwrap());
        assert_eq!(counted_runs(&tok, ex), vec![format!("{output}<|im_end|>")]);
    }
    // A value containing a placeholder's text is inserted as is.
    let rec = Record::Alpaca { instruction: "Explain {input}".into(), input: "{instruction}".into(), output: "ok".into() };
    let ex = Encoder::new(&tok, None, opts()).unwrap().encode(&rec).unwrap();
    assert!(tok.decode(&ex.ids, false).unwrap().contains("### Instruction:\nExplain {input}\n\n### Input:\n{instruction}\n\n"));
    // Without a template: the Alpaca prompt text, then the output and eos counted.
    let td = ds.tokenize(&Encoder::new(&tok, None, opts()).unwrap()).unwrap();
    let prompts = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nName the largest planet.\n\n### Response:\n",
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n7 and 5\n\n### Response:\n",
    ];
    for (i, p) in prompts.iter().enumerate() {
        let ex = &td.examples()[i];
        let Record::Alpaca { output, .. } = &ds.records()[i] else { unreachable!() };
        assert_eq!(tok.decode(&ex.ids[..ex.labels.iter().take_while(|&&l| l == IGNORE).count()], false).unwrap(), *p);
        let mut ids = tok.encode(&format!("{p}{output}"), true).unwrap();
        ids.push(IM_END);
        assert_eq!(ex.ids, ids);
        assert_eq!(counted_runs(&tok, ex), vec![format!("{output}<|im_end|>")]);
    }
}

#[test]
fn explicit_formats_and_names() {
    for (name, f) in [("auto", Format::Auto), ("text", Format::Text), ("prompt-completion", Format::PromptCompletion), ("chat", Format::Messages), ("messages", Format::Messages), ("alpaca", Format::Alpaca)] {
        assert_eq!(Format::parse(name).unwrap(), f);
    }
    assert!(Format::parse("sharegpt").is_err());
    // A chat file read as text: line 1 lacks "text".
    let e = format_err(Dataset::from_jsonl("chat.jsonl", &read("data/chat.jsonl"), Format::Text));
    assert!(e.starts_with("chat.jsonl: line 1: missing field \"text\""), "{e}");
    // Keys of several formats: messages wins, extra keys are ignored.
    let ds = Dataset::from_jsonl("m.jsonl", br#"{"text": "x", "messages": [{"role": "user", "content": "u"}]}"#, Format::Auto).unwrap();
    assert_eq!(ds.format(), Format::Messages);
}

// ---------------------------------------------------------------- bad input

#[test]
fn bad_lines_name_file_and_line() {
    let good = r#"{"prompt": "a", "completion": "b"}"#;
    let cases: &[(&str, &str)] = &[
        ("{\"prompt\": \"a\", \"completion\": ", "line 3: not valid JSON"),
        ("[1, 2]", "line 3: expected a JSON object, found an array"),
        ("\"just a string\"", "line 3: expected a JSON object, found a string"),
        (r#"{"prompt": "a"}"#, "line 3: missing field \"completion\" (format prompt/completion); the format was detected from line 1"),
        (r#"{"prompt": "a", "completion": 5}"#, "line 3: field \"completion\" must be a string, found a number"),
        (r#"{"prompt": null, "completion": "b"}"#, "line 3: field \"prompt\" must be a string, found null"),
        (r#"{"prompt": "a", "completion": ""}"#, "line 3: field \"completion\" is empty"),
    ];
    for (bad, want) in cases {
        // Line 2 is blank, line 3 is bad: the count includes blank lines.
        let bytes = format!("{good}\n\n{bad}\n{good}\n");
        let e = format_err(Dataset::from_jsonl("bad.jsonl", bytes.as_bytes(), Format::Auto));
        assert!(e.starts_with(&format!("bad.jsonl: {want}")), "{e}\n  wanted: {want}");
    }
    let cases: &[(&str, Format, &str)] = &[
        (r#"{"text": ""}"#, Format::Text, "line 1: field \"text\" is empty"),
        (r#"{"text": ["a"]}"#, Format::Auto, "line 1: field \"text\" must be a string, found an array"),
        (r#"{"messages": []}"#, Format::Auto, "line 1: field \"messages\" is empty"),
        (r#"{"messages": {"role": "user"}}"#, Format::Auto, "line 1: field \"messages\" must be an array, found an object"),
        (r#"{"messages": ["hi"]}"#, Format::Auto, "line 1: messages[0] must be an object, found a string"),
        (r#"{"messages": [{"role": "user"}]}"#, Format::Auto, "line 1: messages[0] has no \"content\""),
        (r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}"#, Format::Auto, "line 1: messages[1].content must be a string, found null"),
        (r#"{"messages": [{"role": "", "content": "a"}]}"#, Format::Auto, "line 1: messages[0].role is empty"),
        (r#"{"instruction": "do", "output": ""}"#, Format::Auto, "line 1: field \"output\" is empty"),
        (r#"{"instruction": "do", "input": 3, "output": "x"}"#, Format::Auto, "line 1: field \"input\" must be a string, found a number"),
        (r#"{"foo": 1}"#, Format::Auto, "line 1: cannot tell the format from the keys [\"foo\"]"),
    ];
    for (bad, fmt, want) in cases {
        let e = format_err(Dataset::from_jsonl("bad.jsonl", bad.as_bytes(), *fmt));
        assert!(e.starts_with(&format!("bad.jsonl: {want}")), "{e}\n  wanted: {want}");
    }
    // Not UTF-8 on line 2.
    let e = format_err(Dataset::from_jsonl("bad.jsonl", b"{\"text\": \"a\"}\n{\"text\": \"\xff\"}", Format::Auto));
    assert!(e.starts_with("bad.jsonl: line 2: not UTF-8"), "{e}");
    // Only blank lines.
    let e = format_err(Dataset::from_jsonl("empty.jsonl", b"\n  \r\n\n", Format::Auto));
    assert!(e.starts_with("empty.jsonl: no examples"), "{e}");
    // CRLF line endings and a BOM are fine.
    let ds = Dataset::from_jsonl("crlf.jsonl", b"\xEF\xBB\xBF{\"text\": \"a\"}\r\n\r\n{\"text\": \"b\"}\r\n", Format::Auto).unwrap();
    assert_eq!(ds.records(), &[Record::Text("a".into()), Record::Text("b".into())]);
    assert_eq!(ds.lines(), &[1, 3]);
}

#[test]
fn tokenize_errors_name_file_and_line() {
    let tok = tok();
    let tmpl = template();
    let chat = b"{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"only a question\"}]}\n";
    let ds = Dataset::from_jsonl("eval.jsonl", chat, Format::Auto).unwrap();
    // No assistant message: nothing to train on.
    let e = format_err(ds.tokenize(&Encoder::new(&tok, Some(&tmpl), opts()).unwrap()));
    assert!(e.starts_with("eval.jsonl: line 3: the conversation has no assistant message"), "{e}");
    // Messages without a chat template.
    let e = format_err(ds.tokenize(&Encoder::new(&tok, None, opts()).unwrap()));
    assert!(e.starts_with("eval.jsonl: line 1: chat messages need a chat template"), "{e}");
    // A tokenizer without eos cannot append one.
    let no_eos = tok.clone().with_special_ids(Default::default());
    let ds = load("text.jsonl", Format::Auto);
    let e = format_err(ds.tokenize(&Encoder::new(&no_eos, None, opts()).unwrap()));
    assert!(e.starts_with("text.jsonl: line 1: the tokenizer has no eos"), "{e}");
    // Without append_eos it needs none: each example is the tokenizer's ids, all counted.
    let td = ds.tokenize(&Encoder::new(&no_eos, None, EncodeOptions { append_eos: false, ..opts() }).unwrap()).unwrap();
    assert_eq!(td.examples().len(), ds.len());
    for (rec, ex) in ds.records().iter().zip(td.examples()) {
        let Record::Text(text) = rec else { panic!("{rec:?}") };
        assert_eq!(ex.ids, tok.encode(text, true).unwrap());
        assert_ne!(ex.ids.last(), Some(&IM_END), "no eos appended");
        assert_eq!(ex.labels, ex.ids.iter().map(|&i| i as i32).collect::<Vec<_>>());
    }
    assert!(Encoder::new(&tok, None, EncodeOptions { max_len: 1, ..opts() }).is_err());
}

// ---------------------------------------------------------------- truncation and stats

#[test]
fn truncation_keeps_the_beginning() {
    let tok = tok();
    let tmpl = template();
    let ds = load("chat.jsonl", Format::Auto);
    let full = ds.tokenize(&Encoder::new(&tok, Some(&tmpl), opts()).unwrap()).unwrap();
    let max_len = 30;
    let cut = ds.tokenize(&Encoder::new(&tok, Some(&tmpl), EncodeOptions { max_len, ..opts() }).unwrap()).unwrap();
    let mut n_cut = 0;
    for (f, c) in full.examples().iter().zip(cut.examples()) {
        let n = f.ids.len().min(max_len);
        assert_eq!(c.ids, f.ids[..n]);
        assert_eq!(c.labels, f.labels[..n]);
        n_cut += (f.ids.len() > max_len) as usize;
    }
    assert!(n_cut >= 2, "the fixture should have long conversations");
    assert_eq!(cut.stats().truncated, n_cut);
    assert_eq!(full.stats().truncated, 0);
    assert_eq!(cut.stats().max_tokens, max_len);
    let lossless = cut.examples().iter().filter(|e| e.n_counted() == 0).count();
    assert!(lossless >= 1, "some answer lies entirely past {max_len} tokens");
    assert_eq!((cut.stats().without_loss, full.stats().without_loss), (lossless, 0));
    // A truncated text example loses its eos.
    let ds = load("text.jsonl", Format::Auto);
    let td = ds.tokenize(&Encoder::new(&tok, None, EncodeOptions { max_len: 4, ..opts() }).unwrap()).unwrap();
    let Record::Text(t) = &ds.records()[0] else { unreachable!() };
    assert_eq!(td.examples()[0].ids, tok.encode(t, true).unwrap()[..4]);
}

#[test]
fn stats_count_examples_tokens_and_scored_tokens() {
    let tok = tok();
    let ds = load("chat.jsonl", Format::Auto);
    let td = ds.tokenize(&Encoder::new(&tok, Some(&template()), opts()).unwrap()).unwrap();
    let s = td.stats();
    assert_eq!(s.examples, 3);
    assert_eq!(s.tokens, td.examples().iter().map(|e| e.ids.len()).sum::<usize>());
    // Counted = tokens of the assistant runs (none is at position 0 here).
    let counted: usize = td.examples().iter().map(|e| e.labels.iter().filter(|&&l| l != IGNORE).count()).sum();
    assert_eq!(s.counted_tokens, counted);
    assert!(s.counted_tokens > 0 && s.counted_tokens < s.tokens);
    // The counted tokens are exactly what the batches of one epoch score.
    let mut sampler = BatchSampler::new(td.len(), 2, true, 7).unwrap();
    let mut scored = 0;
    for _ in 0..sampler.batches_per_epoch() {
        scored += td.batch(&sampler.next_batch(), pad_id(&tok)).unwrap().n_tokens();
    }
    assert_eq!(scored, s.counted_tokens);
    assert_eq!(sampler.state().at.epoch, 1);
}

// ---------------------------------------------------------------- batches

#[test]
fn collate_pads_right_and_shifts() {
    let a = Example { ids: vec![10, 11, 12, 13], labels: vec![IGNORE, IGNORE, 12, 13] };
    let b = Example { ids: vec![20, 21], labels: vec![20, 21] };
    let c = Example { ids: vec![30], labels: vec![30] };
    let batch = collate(&[&a, &b, &c], 2).unwrap();
    assert_eq!((batch.batch, batch.seq), (3, 4));
    assert_eq!(batch.ids, vec![10, 11, 12, 13, 20, 21, 2, 2, 30, 2, 2, 2]);
    // target[b, t] = labels[b, t + 1]; -100 at each example's last token and on padding.
    assert_eq!(batch.targets, vec![IGNORE, 12, 13, IGNORE, 21, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]);
    assert_eq!(batch.n_tokens(), 3);
    assert!(collate(&[], 0).is_err());
    assert!(collate(&[&Example { ids: vec![1, 2], labels: vec![1] }], 0).is_err());
    assert!(collate(&[&Example { ids: vec![], labels: vec![] }], 0).is_err());
}

#[test]
fn batch_of_tokenized_chat() {
    let tok = tok();
    assert_eq!(pad_id(&tok), IM_END, "SmolLM2 pads with <|im_end|>");
    let ds = load("chat.jsonl", Format::Auto);
    let td = ds.tokenize(&Encoder::new(&tok, Some(&template()), opts()).unwrap()).unwrap();
    let batch = td.batch(&[2, 0], pad_id(&tok)).unwrap();
    let (e2, e0) = (&td.examples()[2], &td.examples()[0]);
    assert_eq!(batch.seq, e2.ids.len().max(e0.ids.len()));
    for (row, e) in [e2, e0].iter().enumerate() {
        let r = row * batch.seq;
        assert_eq!(batch.ids[r..r + e.ids.len()], e.ids[..]);
        assert!(batch.ids[r + e.ids.len()..r + batch.seq].iter().all(|&i| i == IM_END));
        assert_eq!(batch.targets[r..r + e.ids.len() - 1], e.labels[1..]);
        assert!(batch.targets[r + e.ids.len() - 1..r + batch.seq].iter().all(|&t| t == IGNORE));
    }
    assert_eq!(batch.n_tokens(), e2.n_counted() + e0.n_counted());
    assert!(td.batch(&[3], 0).is_err());
}

// ---------------------------------------------------------------- order

fn epoch(s: &mut BatchSampler) -> Vec<usize> {
    (0..s.batches_per_epoch()).flat_map(|_| s.next_batch()).collect()
}

#[test]
fn shuffling_is_a_seeded_permutation_per_epoch() {
    let n = 23;
    let mut s = BatchSampler::new(n, 5, true, 42).unwrap();
    assert_eq!(s.batches_per_epoch(), 5);
    let sizes: Vec<usize> = (0..5).map(|_| s.next_batch().len()).collect();
    assert_eq!(sizes, vec![5, 5, 5, 5, 3], "the last batch of an epoch holds the remainder");
    let mut s = BatchSampler::new(n, 5, true, 42).unwrap();
    let e0 = epoch(&mut s);
    let e1 = epoch(&mut s);
    for e in [&e0, &e1] {
        assert_eq!(e.iter().copied().collect::<BTreeSet<_>>(), (0..n).collect::<BTreeSet<_>>(), "a permutation");
    }
    assert_ne!(e0, e1, "each epoch has its own order");
    assert_ne!(e0, (0..n).collect::<Vec<_>>());
    assert_eq!(e0, epoch_order(n, true, 42, 0));
    assert_eq!(e1, epoch_order(n, true, 42, 1));
    // Same seed, same sequence; another seed, another one.
    let mut again = BatchSampler::new(n, 5, true, 42).unwrap();
    assert_eq!((epoch(&mut again), epoch(&mut again)), (e0.clone(), e1));
    assert_ne!(epoch(&mut BatchSampler::new(n, 5, true, 43).unwrap()), e0);
    // Without shuffling: file order every epoch.
    let mut plain = BatchSampler::new(n, 4, false, 42).unwrap();
    assert_eq!(epoch(&mut plain), (0..n).collect::<Vec<_>>());
    assert_eq!(epoch(&mut plain), (0..n).collect::<Vec<_>>());
    assert!(BatchSampler::new(0, 4, true, 1).is_err());
    assert!(BatchSampler::new(4, 0, true, 1).is_err());
}

#[test]
fn saved_state_resumes_the_same_sequence() {
    let n = 11;
    let mut s = BatchSampler::new(n, 3, true, 9).unwrap();
    let reference: Vec<Vec<usize>> = (0..20).map(|_| s.next_batch()).collect();
    for stop in [0, 1, 3, 4, 7, 13] {
        let mut a = BatchSampler::new(n, 3, true, 9).unwrap();
        for _ in 0..stop {
            a.next_batch();
        }
        // Through JSON, as a checkpoint would store it.
        let saved = serde_json::to_string(&a.state()).unwrap();
        let state: SamplerState = serde_json::from_str(&saved).unwrap();
        let mut b = BatchSampler::resume(state, n, 3).unwrap();
        let rest: Vec<Vec<usize>> = (stop..20).map(|_| b.next_batch()).collect();
        assert_eq!(rest, reference[stop..], "resumed after {stop} batches");
    }
    // After a whole epoch (4 batches of 3, 3, 3, 2) the state points at the next epoch's start.
    let mut a = BatchSampler::new(n, 3, true, 9).unwrap();
    for _ in 0..4 {
        a.next_batch();
    }
    let st = a.state();
    assert_eq!((st.at.epoch, st.at.index, st.seed, st.n_examples, st.shuffle), (1, 0, 9, 11, true));
    assert_eq!(st.data_position(), qlora_webgpu::train::DataPosition { epoch: 1, index: 0 });
    // A state for another data set size, or a position past the end, is refused.
    assert!(BatchSampler::resume(st, n + 1, 3).is_err());
    assert!(BatchSampler::resume(SamplerState { at: DataPosition { epoch: st.at.epoch, index: 11 }, ..st }, n, 3).is_err());
}

// ---------------------------------------------------------------- validation split

#[test]
fn validation_split_is_deterministic_and_disjoint() {
    let n = 50;
    let (t, v) = split_indices(n, Split::Fraction(0.1), 3).unwrap();
    assert_eq!((t.len(), v.len()), (45, 5));
    assert_eq!(split_indices(n, Split::Fraction(0.1), 3).unwrap(), (t.clone(), v.clone()));
    assert_ne!(split_indices(n, Split::Fraction(0.1), 4).unwrap().1, v);
    let all: BTreeSet<usize> = t.iter().chain(&v).copied().collect();
    assert_eq!(all, (0..n).collect::<BTreeSet<_>>(), "disjoint and complete");
    assert!(t.windows(2).all(|w| w[0] < w[1]) && v.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(split_indices(n, Split::Count(7), 3).unwrap().1.len(), 7);
    assert_eq!(split_indices(n, Split::Count(0), 3).unwrap(), ((0..n).collect::<Vec<_>>(), vec![]));
    assert_eq!(split_indices(10, Split::Fraction(0.25), 1).unwrap().1.len(), 3, "rounded: 2.5 -> 3");
    assert!(split_indices(n, Split::Count(50), 3).is_err());
    assert!(split_indices(n, Split::Fraction(1.0), 3).is_err());
    assert!(split_indices(n, Split::Fraction(-0.1), 3).is_err());

    // On a data set: records and their lines travel together.
    let tok = tok();
    let ds = load("chat.jsonl", Format::Auto);
    let (tr, va) = ds.split_validation(Split::Count(1), 5).unwrap();
    assert_eq!((tr.len(), va.len()), (2, 1));
    let (_, vi) = split_indices(3, Split::Count(1), 5).unwrap();
    assert_eq!(va.records()[0], ds.records()[vi[0]]);
    assert_eq!(va.lines()[0], ds.lines()[vi[0]]);
    // And on tokenized examples, the same indices.
    let td = ds.tokenize(&Encoder::new(&tok, Some(&template()), opts()).unwrap()).unwrap();
    let (_, tv) = td.split_validation(Split::Count(1), 5).unwrap();
    assert_eq!(tv.examples()[0], td.examples()[vi[0]]);
}

// ---------------------------------------------------------------- the example data set

#[test]
fn pirate_data_set_parses_and_tokenizes() {
    let tok = tok();
    let tmpl = template();
    let train = Dataset::from_jsonl_file(std::path::Path::new(&format!("{ROOT}/data/pirate.jsonl")), Format::Auto).unwrap();
    assert_eq!(train.format(), Format::Messages);
    assert!((60..=100).contains(&train.len()), "{} examples", train.len());
    let td = train.tokenize(&Encoder::new(&tok, Some(&tmpl), opts()).unwrap()).unwrap();
    assert_eq!(td.stats().truncated, 0);
    let mut questions = BTreeSet::new();
    for (rec, ex) in train.records().iter().zip(td.examples()) {
        let Record::Messages(m) = rec else { unreachable!() };
        assert_eq!(m.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(), ["user", "assistant"]);
        assert!(m[1].content.starts_with("Arr"), "{:?}", m[1].content);
        assert_eq!(counted_runs(&tok, ex), vec![format!("{}<|im_end|>", m[1].content)]);
        assert!(questions.insert(m[0].content.clone()), "duplicate question {:?}", m[0].content);
    }
    let eval = Dataset::from_jsonl_file(std::path::Path::new(&format!("{ROOT}/data/pirate_eval.jsonl")), Format::Auto).unwrap();
    assert_eq!(eval.len(), 5);
    for rec in eval.records() {
        let Record::Messages(m) = rec else { unreachable!() };
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].role, "user");
        assert!(!questions.contains(&m[0].content), "held-out prompt {:?} is in the training set", m[0].content);
    }
}
