//! Tests of the tool-call parsers on outputs as the models write them: each format whole, then the stream
//! against the whole parse on every split of every example, of mutated examples and of generated junk.

use serde_json::Value;

use super::*;

fn call(name: &str, arguments: &str) -> ToolCall {
    ToolCall { name: name.to_string(), arguments: arguments.to_string() }
}

fn calls(content: Option<&str>, calls: &[(&str, &str)]) -> Option<Parsed> {
    Some(Parsed { content: content.map(str::to_string), calls: calls.iter().map(|(n, a)| call(n, a)).collect() })
}

const PARIS: (&str, &str) = ("get_weather", r#"{"city":"Paris"}"#);
const TIME: (&str, &str) = ("get_time", r#"{"timezone":"Europe/Paris"}"#);
/// As models write them: literal non-ASCII, escapes (a surrogate pair, `\/`), a tab.
const UNICODE: &str =
    concat!(r#"{"text": "naïve café, 東京 😀", "#, r#""escaped": "\u00e9\ud83d\ude00 \"q\" \\ \/", "tab": "a\tb"}"#);
const UNICODE_ARGS: &str = r#"{"text":"naïve café, 東京 😀","escaped":"é😀 \"q\" \\ /","tab":"a\tb"}"#;
const NESTED: &str = concat!(
    r#"{"event": {"title": "Standup", "attendees": [{"name": "Ana", "optional": false}, {"name": "Bo"}], "#,
    r#""hours": 1.5, "room": null}}"#
);
const NESTED_ARGS: &str = concat!(
    r#"{"event":{"title":"Standup","attendees":[{"name":"Ana","optional":false},{"name":"Bo"}],"#,
    r#""hours":1.5,"room":null}}"#
);

const TRANSLATE: (&str, &str) = ("translate", UNICODE_ARGS);
const EVENT: (&str, &str) = ("create_event", NESTED_ARGS);

const WEATHER: &str = r#"{"name": "get_weather", "parameters": {"city": "Paris"}}"#;
const TIME_CALL: &str = r#"{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}"#;
const M_WEATHER: &str = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
const M_TIME: &str = r#"{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}"#;

fn obj(name: &str, key: &str, args: &str) -> String {
    format!(r#"{{"name": "{name}", "{key}": {args}}}"#)
}

fn hermes(body: &str) -> String {
    format!("<tool_call>\n{body}\n</tool_call>")
}

/// An output as a model writes it, and what it reads as (None: the whole text is content, as for a
/// malformed call).
type Row = (Format, String, Option<Parsed>);

fn llama_examples() -> Vec<Row> {
    use Format::*;
    let (weather, time) = (WEATHER, TIME_CALL);
    vec![
        // Llama 3.1/3.2/3.3.
        (Llama3Json, weather.into(), calls(None, &[PARIS])),
        (Llama3Json, format!("<|python_tag|>{weather}"), calls(None, &[PARIS])),
        (Llama3Json, r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#.into(), calls(None, &[PARIS])),
        (
            Llama3Json,
            "\n\n{\"type\": \"function\", \"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}".into(),
            calls(None, &[PARIS]),
        ),
        (Llama3Json, format!("{weather}; {time}"), calls(None, &[PARIS, TIME])),
        (Llama3Json, format!("<|python_tag|>{weather};<|python_tag|>{time}"), calls(None, &[PARIS, TIME])),
        (Llama3Json, format!("{weather}\n\nI did."), calls(Some("I did."), &[PARIS])),
        (Llama3Json, obj("translate", "parameters", UNICODE), calls(None, &[TRANSLATE])),
        (Llama3Json, obj("create_event", "parameters", NESTED), calls(None, &[EVENT])),
        (Llama3Json, r#"{"name": "get_time", "parameters": {}}"#.into(), calls(None, &[("get_time", "{}")])),
        (Llama3Json, "The weather in Paris is sunny, 22 °C.".into(), None),
        (Llama3Json, format!("Sure: {weather}"), None),
        (Llama3Json, "<|python_ta".into(), None),
        (Llama3Json, "<b>bold</b>".into(), None),
        (Llama3Json, r#"{"name": "Alice", "age": 30}"#.into(), None),
        (Llama3Json, "  ".into(), Some(Parsed::default())),
        (Llama3Json, "".into(), Some(Parsed::default())),
        (Llama3Json, r#"{"name": "get_weather", "parameters": {"city": "Paris"}"#.into(), None),
        (Llama3Json, r#"{"name": "get_weather", "parameters": {"city": Paris}}"#.into(), None),
        (Llama3Json, r#"{"answer": 42, "parameters": {}}"#.into(), None),
        (Llama3Json, r#"{"name": "get_weather", "parameters": "city=Paris"}"#.into(), None),
        (Llama3Json, r#"<|python_tag|>get_weather(city="Paris")"#.into(), None),
        (Llama3Json, format!(r#"{weather}; {{"name": "get_time", "parameters": {{"timezone": }}}}"#), None),
    ]
}

fn mistral_examples() -> Vec<Row> {
    use Format::*;
    let (m_weather, m_time) = (M_WEATHER, M_TIME);
    vec![
        (Mistral, format!("[TOOL_CALLS][{m_weather}]"), calls(None, &[PARIS])),
        (Mistral, format!("[TOOL_CALLS] [{m_weather}, {m_time}]"), calls(None, &[PARIS, TIME])),
        (
            Mistral,
            r#"[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]"#.into(),
            calls(None, &[PARIS]),
        ),
        (Mistral, format!("Let me check.[TOOL_CALLS][{m_weather}]"), calls(Some("Let me check."), &[PARIS])),
        (Mistral, r#"[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}"#.into(), calls(None, &[PARIS])),
        (Mistral, r#"[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}"#.into(), calls(None, &[PARIS])),
        (Mistral, r#"[TOOL_CALLS]get_weather{"city": "Paris"}"#.into(), calls(None, &[PARIS])),
        (
            Mistral,
            concat!(
                r#"I'll look both up.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}"#,
                r#"[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}"#
            )
            .into(),
            calls(Some("I'll look both up."), &[PARIS, TIME]),
        ),
        (Mistral, format!("[TOOL_CALLS]translate[ARGS]{UNICODE}"), calls(None, &[TRANSLATE])),
        (Mistral, format!("[TOOL_CALLS][{}]", obj("create_event", "arguments", NESTED)), calls(None, &[EVENT])),
        (Mistral, "[TOOL_CALLS][]".into(), Some(Parsed::default())),
        (Mistral, "Paris is the capital of France [1].".into(), None),
        (Mistral, "[TOOL_CALL".into(), None),
        (Mistral, format!("[TOOL_CALLS][{m_weather}"), None),
        (Mistral, r#"[TOOL_CALLS][{"arguments": {"city": "Paris"}}]"#.into(), None),
        (Mistral, r#"[TOOL_CALLS]Sure, the weather{"city": "Paris"}"#.into(), None),
        (Mistral, r#"Hi [TOOL_CALLS]get_weather[ARGS]["Paris"]"#.into(), None),
    ]
}

/// Hermes 2/3, Qwen2/2.5; and the JSON array.
fn hermes_and_array_examples() -> Vec<Row> {
    use Format::*;
    let (weather, time, m_weather, m_time, h) = (WEATHER, TIME_CALL, M_WEATHER, M_TIME, hermes);
    vec![
        (Hermes, h(m_weather), calls(None, &[PARIS])),
        (Hermes, format!("I'll check.\n{}", h(m_weather)), calls(Some("I'll check.\n"), &[PARIS])),
        (Hermes, format!("{}\n{}", h(m_weather), h(m_time)), calls(None, &[PARIS, TIME])),
        (
            Hermes,
            h(r#"{"arguments": {"symbol": "TSLA"}, "name": "get_stock_fundamentals"}"#) + "\nDone, <b>see</b> above.",
            calls(Some("\nDone, <b>see</b> above."), &[("get_stock_fundamentals", r#"{"symbol":"TSLA"}"#)]),
        ),
        (Hermes, format!("<tool_call>\n{m_weather}"), calls(None, &[PARIS])),
        (Hermes, format!("<tool_call>\n{m_weather}\n</tool_"), calls(None, &[PARIS])),
        (Hermes, h(&obj("translate", "arguments", UNICODE)), calls(None, &[TRANSLATE])),
        (Hermes, h(&obj("create_event", "arguments", NESTED)), calls(None, &[EVENT])),
        (Hermes, "Compare a < b, then <tool>x</tool> and <tool_cal".into(), None),
        (Hermes, "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Par".into(), None),
        (Hermes, format!("Hm. {}", h("{'name': 'get_weather', 'arguments': {'city': 'Paris'}}")), None),
        (Hermes, h(&format!("{m_weather} trailing")), None),
        (Hermes, "<tool_call>\n</tool_call>".into(), None),
        // The array a `tool_choice: "required"` request is constrained to.
        (JsonArray, format!("[{weather}]"), calls(None, &[PARIS])),
        (JsonArray, format!(" [{weather}, {time}] "), calls(None, &[PARIS, TIME])),
        (JsonArray, format!("[{weather}"), None),
        (JsonArray, format!(r#"[{weather} {{"name": "get_time"}}]"#), None),
        (JsonArray, "I cannot call a tool.".into(), None),
    ]
}

/// The whole output is content.
fn text_only(text: &str) -> Parsed {
    Parsed { content: Some(text.to_string()), calls: Vec::new() }
}

fn examples() -> Vec<(Format, String, Parsed)> {
    [llama_examples(), mistral_examples(), hermes_and_array_examples()]
        .concat()
        .into_iter()
        .map(|(f, text, want)| (f, text.clone(), want.unwrap_or_else(|| text_only(&text))))
        .collect()
}

#[test]
fn examples_parse_whole() {
    for (format, text, want) in examples() {
        let text = text.as_str();
        let got = parse(format, text);
        assert_eq!(got, want, "{format:?} {text:?}");
        for c in &got.calls {
            // The arguments are exactly serde's compact form of themselves.
            let v: Value = serde_json::from_str(&c.arguments).unwrap();
            assert!(v.is_object());
            assert_eq!(serde_json::to_string(&v).unwrap(), c.arguments);
        }
    }
}

/// Streams `pieces`, checking the deltas' order, and returns what they add up to and whether a call was
/// malformed after it started (where the stream cannot take back what it sent, so it differs from
/// [`parse`]).
fn stream(format: Format, pieces: &[&str]) -> (Parsed, bool) {
    let mut p = StreamParser::new(format);
    let mut deltas = Vec::new();
    for piece in pieces {
        deltas.extend(p.push(piece));
    }
    deltas.extend(p.finish());
    let mut started = 0;
    for d in &deltas {
        match d {
            Delta::CallStart { index, .. } => {
                assert_eq!(*index, started, "{pieces:?}");
                started += 1;
            }
            Delta::Arguments { index, fragment } => assert!(*index < started && !fragment.is_empty(), "{pieces:?}"),
            Delta::Content(s) => assert!(!s.is_empty()),
        }
    }
    assert_eq!(p.saw_calls(), started > 0);
    (assemble(deltas), p.failed() && p.saw_calls())
}

/// Any split gives what the whole output does: what `parse` returns, or, for a call malformed after its
/// start went out, what the unsplit stream gives.
fn check_split(format: Format, text: &str, pieces: &[&str]) {
    let (whole, late_failure) = stream(format, &[text]);
    if !late_failure {
        assert_eq!(whole, parse(format, text), "{format:?} {text:?}");
    }
    assert_eq!(stream(format, pieces), (whole, late_failure), "{format:?} {pieces:?}");
}

/// A tiny LCG (Knuth's MMIX constants): the coordinator has no `rand` in tests, and a fixed seed keeps
/// failures reproducible.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

/// `text` cut into pieces of 1 to `max` characters.
fn random_split<'a>(rng: &mut Lcg, text: &'a str, max: usize) -> Vec<&'a str> {
    let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
    let (mut pieces, mut at) = (Vec::new(), 0);
    while at + 1 < bounds.len() {
        let next = (at + 1 + rng.below(max)).min(bounds.len() - 1);
        pieces.push(&text[bounds[at]..bounds[next]]);
        at = next;
    }
    pieces
}

#[test]
fn streaming_equals_whole_for_every_two_way_split() {
    for (format, text, _) in examples() {
        let text = text.as_str();
        for (i, _) in text.char_indices().chain([(text.len(), ' ')]) {
            check_split(format, text, &[&text[..i], &text[i..]]);
        }
    }
}

#[test]
fn streaming_equals_whole_for_random_and_char_by_char_splits() {
    let mut rng = Lcg(0x7e55e7a);
    for (format, text, _) in examples() {
        let text = text.as_str();
        let chars: Vec<&str> = text.char_indices().map(|(i, c)| &text[i..i + c.len_utf8()]).collect();
        check_split(format, text, &chars);
        for max in [2, 3, 5, 8, 16] {
            let pieces = random_split(&mut rng, text, max);
            check_split(format, text, &pieces);
        }
    }
}

#[test]
fn junk_never_panics_and_splits_agree() {
    const ATOMS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        "\"",
        "\\",
        ":",
        ",",
        ";",
        " ",
        "\n",
        "name",
        "\"name\"",
        "\"arguments\"",
        "\"parameters\"",
        "\"f\"",
        "<tool_call>",
        "</tool_call>",
        "[TOOL_CALLS]",
        "[ARGS]",
        "<|python_tag|>",
        "<",
        "é",
        "😀",
        "1",
        "-2.5e3",
        "true",
        "null",
        "\\u00e9",
        "\\ud83d",
        "\\ude00",
        "\t",
        "x",
    ];
    let mut rng = Lcg(42);
    for format in [Format::Llama3Json, Format::Mistral, Format::Hermes, Format::JsonArray] {
        for _ in 0..300 {
            let text: String = (0..rng.below(40)).map(|_| ATOMS[rng.below(ATOMS.len())]).collect();
            let pieces = random_split(&mut rng, &text, 4);
            check_split(format, &text, &pieces);
        }
    }
}

#[test]
fn mutated_examples_never_panic_and_splits_agree() {
    const ATOMS: &[&str] = &["{", "}", "]", "\"", "\\", ",", ";", " ", "<tool_call>", "[TOOL_CALLS]", "😀", "1", "x"];
    let mut rng = Lcg(7);
    for (format, text, _) in examples() {
        let text = text.as_str();
        let chars: Vec<&str> = text.char_indices().map(|(i, c)| &text[i..i + c.len_utf8()]).collect();
        for _ in 0..40 {
            let mut mutated = chars.clone();
            for _ in 0..=rng.below(3) {
                let at = rng.below(mutated.len() + 1);
                match rng.below(3) {
                    0 if at < mutated.len() => {
                        mutated.remove(at);
                    }
                    1 if at > 0 => mutated.truncate(at),
                    _ => mutated.insert(at, ATOMS[rng.below(ATOMS.len())]),
                }
            }
            let mutated = mutated.concat();
            let pieces = random_split(&mut rng, &mutated, 6);
            check_split(format, &mutated, &pieces);
        }
    }
}

#[test]
fn arguments_stream_as_they_are_written() {
    let mut p = StreamParser::new(Format::Hermes);
    let content = |s: &str| vec![Delta::Content(s.to_string())];
    assert_eq!(p.push("Let me check"), content("Let me check"));
    // A possible `<tool_call>` is held back until it is known not to be one.
    assert_eq!(p.push(". <"), content(". "));
    assert_eq!(p.push("b> <tool"), content("<b> "));
    assert_eq!(p.push("_call>\n{\"name\": \"get_"), vec![]);
    assert_eq!(
        p.push("weather\", \"arguments\": {\"city\""),
        vec![
            Delta::CallStart { index: 0, name: "get_weather".into() },
            Delta::Arguments { index: 0, fragment: "{\"city\"".into() },
        ]
    );
    assert_eq!(p.push(": \"Pa"), vec![Delta::Arguments { index: 0, fragment: ":\"Pa".into() }]);
    // A number is written once it is known to have ended.
    assert_eq!(p.push("ris\", \"days\": 1"), vec![Delta::Arguments { index: 0, fragment: "ris\",\"days\":".into() }]);
    assert_eq!(p.push("0}}\n</tool_call>"), vec![Delta::Arguments { index: 0, fragment: "10}".into() }]);
    assert!(p.saw_calls());
    assert_eq!(p.finish(), vec![]);
}

#[test]
fn a_name_after_the_arguments_starts_the_call_when_it_comes() {
    let mut p = StreamParser::new(Format::Hermes);
    assert_eq!(p.push("<tool_call>\n{\"arguments\": {\"symbol\": \"TSLA\"}, "), vec![]);
    assert!(!p.saw_calls());
    assert_eq!(
        p.push("\"name\": \"get_stock_fundamentals\"}"),
        vec![
            Delta::CallStart { index: 0, name: "get_stock_fundamentals".into() },
            Delta::Arguments { index: 0, fragment: "{\"symbol\":\"TSLA\"}".into() },
        ]
    );
}

#[test]
fn a_call_malformed_before_its_name_goes_out_as_content() {
    let mut p = StreamParser::new(Format::Mistral);
    assert_eq!(p.push("Hi[TOOL_CALLS][{\"name\": "), vec![Delta::Content("Hi".into())]);
    let rest = "[TOOL_CALLS][{\"name\": 12, \"arguments\": {}}]";
    assert_eq!(p.push("12, \"arguments\": {}}]"), vec![Delta::Content(rest.into())]);
    assert_eq!(p.finish(), vec![]);
    assert!(!p.saw_calls());
    // An unterminated call is only known to be malformed at the end.
    let mut p = StreamParser::new(Format::Llama3Json);
    assert_eq!(p.push("  {\"name\": \"get_wea"), vec![]);
    assert_eq!(p.finish(), vec![Delta::Content("  {\"name\": \"get_wea".into())]);
}

#[test]
fn a_call_malformed_after_its_start_cannot_be_taken_back() {
    let text = "{\"name\": \"f\", \"parameters\": {'a': 1}}";
    let mut p = StreamParser::new(Format::Llama3Json);
    assert_eq!(
        p.push(text),
        vec![
            Delta::CallStart { index: 0, name: "f".into() },
            Delta::Arguments { index: 0, fragment: "{".into() },
            Delta::Content(text.into()),
        ]
    );
    assert!(p.saw_calls());
    assert_eq!(parse(Format::Llama3Json, text), text_only(text));
}

#[test]
fn formats_by_name() {
    for name in Format::names() {
        assert!(Format::from_name(name).is_some(), "{name}");
    }
    assert_eq!(Format::from_name("hermes"), Some(Format::Hermes));
    assert_eq!(Format::from_name("llama3_json"), Some(Format::Llama3Json));
    assert_eq!(Format::from_name("mistral"), Some(Format::Mistral));
    assert_eq!(Format::from_name("pythonic"), None);
    assert_eq!(Format::from_name("json_array"), None);
}

#[test]
fn formats_detected_from_chat_templates() {
    let qwen25 = concat!(
        r#"{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments "#,
        r#"within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "#,
        r#"\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}"#
    );
    let hermes3 = r#"{{- '<tool_call>\n' }}{{- tool_call | tojson }}{{- '\n</tool_call>' }}"#;
    let mistral_v03 =
        r#"{%- elif message.tool_calls is defined and message.tool_calls is not none %}{{- "[TOOL_CALLS] [" }}"#;
    let mistral_small =
        r#"{%- for tool in message.tool_calls %}{{- '[TOOL_CALLS]' + tool.function.name + '[ARGS]' + arguments }}"#;
    let llama31 = r#"{{- "<|python_tag|>" + tool_call.name + ".call(" }}{%- if message.role == "ipython" %}"#;
    let llama32 = concat!(
        r#"{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its "#,
        r#"value}.' }}{%- elif message.role == "tool" or message.role == "ipython" %}"#,
        r#"{{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}"#
    );
    let chatml = concat!(
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + ",
        "'<|im_end|>' + '\n'}}{% endfor %}"
    );
    let llama3 = concat!(
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + ",
        "'<|eot_id|>' }}"
    );
    assert_eq!(Format::detect(qwen25), Some(Format::Hermes));
    assert_eq!(Format::detect(hermes3), Some(Format::Hermes));
    assert_eq!(Format::detect(mistral_v03), Some(Format::Mistral));
    assert_eq!(Format::detect(mistral_small), Some(Format::Mistral));
    assert_eq!(Format::detect(llama31), Some(Format::Llama3Json));
    assert_eq!(Format::detect(llama32), Some(Format::Llama3Json));
    assert_eq!(Format::detect(chatml), None);
    assert_eq!(Format::detect(llama3), None);
    assert_eq!(Format::detect(""), None);
}
