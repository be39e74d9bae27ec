//! Constrained decoding: what a choice may generate (a JSON schema, a regular expression, one of a list of
//! strings, a Lark grammar), compiled by llguidance into a [`Constraint`] that gives the allowed-token
//! mask before each sampled token and follows the tokens sampled. `vocab` gives llguidance the model's
//! vocabulary as bytes.
//!
//! The API compiles a request's [`Spec`] once ([`Grammars::compile`], off the HTTP runtime, where a bad
//! schema becomes a 400) and computes the first mask there; each choice gets its own copy. The engine loop
//! advances a constraint with every token its sequence samples and computes the next masks of all its
//! constrained sequences together, in parallel, before the next step; the step carries each mask (one bit per
//! vocabulary id) to the rank that samples, which sets every other token's logit to −∞ before sampling.
//! The constraint moves with its sequence when it is preempted or migrates, so the mask always follows the
//! tokens already sent.

mod vocab;

use std::sync::Arc;

use llguidance::{Matcher, ParserFactory, api::TopLevelGrammar};
use serde_json::{Value, json};

/// What a request constrains its output to.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// A JSON value that validates against this schema (`{"type": "object"}` for OpenAI's `json_object`).
    JsonSchema(Value),
    /// Text matching the regular expression, whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of a Lark grammar (llguidance's dialect of Lark's EBNF: `start: ...` rules, `/regex/` terminals).
    Grammar(String),
}

/// Whitespace allowed between JSON tokens: one space, or a line break or two and an indent of at most 20
/// spaces or tabs, as llama.cpp's JSON grammars allow it. llguidance's default is any run of whitespace, and
/// a model that likes whitespace (or a random one) then fills `max_tokens` with it. A schema may set its own
/// with `x-guidance`.
const JSON_WHITESPACE: &str = r"(?: |\n{1,2}[ \t]{0,20})";

/// Longest text a schema, regex or grammar may have, and most choices: bounds what compiling costs.
pub const MAX_SPEC_BYTES: usize = 256 << 10;
pub const MAX_CHOICES: usize = 1024;

impl Spec {
    fn grammar(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Spec::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(o) = schema.as_object_mut() {
                    let opts = o.entry("x-guidance").or_insert_with(|| json!({}));
                    if let Some(opts) = opts.as_object_mut()
                        && !opts.contains_key("whitespace_flexible")
                    {
                        opts.entry("whitespace_pattern").or_insert_with(|| json!(JSON_WHITESPACE));
                    }
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Spec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Spec::Choice(options) => {
                let alternatives: Vec<String> = options.iter().map(|o| regex_syntax::escape(o)).collect();
                TopLevelGrammar::from_regex(&alternatives.join("|"))
            }
            Spec::Grammar(g) => TopLevelGrammar::from_lark(g.clone()),
        })
    }
}

/// The grammar compiler for one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
}

impl Grammars {
    /// For `tokenizer` on a model of `vocab_size` ids; an error says why this tokenizer's tokens cannot
    /// be mapped to bytes (and so why constrained requests are refused).
    pub fn new(tokenizer: &crate::tokenizer::Tokenizer, vocab_size: usize) -> Result<Self, String> {
        let env = vocab::tok_env(tokenizer, vocab_size)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory })
    }

    /// Compiles `spec`, with the mask for the first token computed. The error is the compiler's message.
    pub fn compile(&self, spec: &Spec) -> Result<Constraint, String> {
        let parser = self.factory.create_parser(spec.grammar()?).map_err(|e| e.to_string())?;
        let mut c = Constraint { matcher: Box::new(Matcher::new(Ok(parser))), mask: None };
        c.prepare()?;
        Ok(c)
    }
}

/// One choice's constraint: the parser state after the tokens it has generated, and the mask for the next.
pub struct Constraint {
    /// Boxed: the parser state is large, and a constraint lives in every scheduled sequence, whose list the
    /// scheduler walks each step (unboxed, every sequence grew by the matcher, constrained or not).
    matcher: Box<Matcher>,
    /// Bit `t % 32` of word `t / 32` allows token `t`; `None` until computed for the current position.
    mask: Option<Arc<[u32]>>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("mask_ready", &self.mask.is_some()).finish()
    }
}

impl Clone for Constraint {
    /// An independent copy (another choice of the same request).
    fn clone(&self) -> Self {
        Constraint { matcher: Box::new(self.matcher.deep_clone()), mask: self.mask.clone() }
    }
}

impl Constraint {
    /// The mask for the next token, if computed.
    pub fn mask(&self) -> Option<&[u32]> {
        self.mask.as_deref()
    }

    /// Whether the next mask is still to be computed ([`Constraint::prepare`]).
    pub fn needs_mask(&self) -> bool {
        self.mask.is_none() && !self.matcher.is_stopped()
    }

    /// Computes the mask for the next token. Fails when the grammar allows no token at all (it cannot go on).
    pub fn prepare(&mut self) -> Result<(), String> {
        if self.mask.is_some() {
            return Ok(());
        }
        let vob = self.matcher.compute_mask().map_err(|e| format!("constrained decoding: {e}"))?;
        if vob.num_set() == 0 {
            return Err("constrained decoding: the grammar allows no token here".into());
        }
        let words = vob.len().div_ceil(32);
        self.mask = Some(vob.as_slice()[..words].into());
        Ok(())
    }

    /// Follows a sampled token. `Ok(true)`: the grammar is complete and nothing may follow, so the choice
    /// ends here. An error means the token was not allowed (the sampler ignored the mask).
    pub fn advance(&mut self, token: u32) -> Result<bool, String> {
        self.mask = None;
        self.matcher.consume_token(token).map_err(|e| format!("constrained decoding: token {token}: {e}"))?;
        Ok(self.matcher.is_stopped())
    }
}

/// Computes the pending masks of `constraints`, in parallel: the engine loop does this between steps,
/// for every constrained sequence at once. Returns the index and message of each that cannot go on.
pub fn prepare_all(constraints: &mut [&mut Constraint]) -> Vec<(usize, String)> {
    use rayon::prelude::*;
    constraints.par_iter_mut().enumerate().filter_map(|(i, c)| c.prepare().err().map(|e| (i, e))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;

    fn stories() -> (Tokenizer, Grammars) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/stories260K");
        let tok = Tokenizer::load(&dir).unwrap();
        let g = Grammars::new(&tok, 512).unwrap();
        (tok, g)
    }

    fn allowed(c: &Constraint, t: u32) -> bool {
        c.mask().unwrap()[t as usize / 32] >> (t % 32) & 1 == 1
    }

    /// Drives a constraint with a deterministic "model" that prefers high token ids: the first allowed id
    /// from the top of the vocabulary, so the walk is far from what a grammar's literal order would give.
    fn walk(tok: &Tokenizer, mut c: Constraint, limit: usize) -> String {
        let mut ids = Vec::new();
        for _ in 0..limit {
            c.prepare().unwrap();
            let t = (0..512u32).rev().find(|&t| allowed(&c, t)).unwrap();
            if tok.is_eos(t) {
                break;
            }
            ids.push(t);
            if c.advance(t).unwrap() {
                break;
            }
        }
        tok.decode(&ids).unwrap()
    }

    #[test]
    fn a_schema_constrains_every_token_until_the_value_is_complete() {
        let (tok, g) = stories();
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3, "maximum": 7},
            "tag": {"enum": ["red", "blue"]}}, "required": ["n", "tag"], "additionalProperties": false});
        let text = walk(&tok, g.compile(&Spec::JsonSchema(schema)).unwrap(), 200);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert!((3..=7).contains(&v["n"].as_i64().unwrap()), "{text}");
        assert!(["red", "blue"].contains(&v["tag"].as_str().unwrap()), "{text}");
        assert_eq!(v.as_object().unwrap().len(), 2);
    }

    #[test]
    fn a_choice_and_a_regex_hold_and_bad_ones_are_refused() {
        let (tok, g) = stories();
        let text = walk(&tok, g.compile(&Spec::Choice(vec!["yes".into(), "no (maybe)".into()])).unwrap(), 50);
        assert!(text == "yes" || text == "no (maybe)", "{text:?}");
        let text = walk(&tok, g.compile(&Spec::Regex("[0-9]{3}-[a-z]{2}".into())).unwrap(), 50);
        assert!(text.len() == 6 && text.as_bytes()[3] == b'-', "{text:?}");
        let lark = "start: item \",\" item\nitem: \"x\" /[0-9]{2}/";
        let text = walk(&tok, g.compile(&Spec::Grammar(lark.into())).unwrap(), 20);
        let ok = |s: &str| s.len() == 3 && s.starts_with('x') && s[1..].bytes().all(|b| b.is_ascii_digit());
        assert!(text.split(',').count() == 2 && text.split(',').all(ok), "{text:?}");
        assert!(g.compile(&Spec::Regex("(unclosed".into())).is_err());
        assert!(g.compile(&Spec::JsonSchema(json!({"type": "no-such-type"}))).is_err());
        assert!(g.compile(&Spec::Grammar("start: undefined_rule".into())).is_err());
    }

    #[test]
    fn a_constraint_costs_an_unconstrained_sequence_little_room() {
        // The matcher itself is over a kilobyte.
        assert!(std::mem::size_of::<Option<Constraint>>() <= 24);
    }

    #[test]
    fn a_clone_goes_its_own_way_and_a_bad_token_is_an_error() {
        let (tok, g) = stories();
        let c = g.compile(&Spec::Choice(vec!["ab".into(), "cd".into()])).unwrap();
        let mut a = c.clone();
        let mut b = c;
        // Byte tokens: a word piece would carry the space before it.
        let byte =
            |ch: u8| (0..512u32).find(|&t| tok.id_to_token(t).as_deref() == Some(&format!("<0x{ch:02X}>"))).unwrap();
        assert!(!a.advance(byte(b'a')).unwrap());
        assert!(b.advance(byte(b'a')).is_ok());
        let mut fresh = g.compile(&Spec::Choice(vec!["ab".into(), "cd".into()])).unwrap();
        assert!(fresh.advance(byte(b'c')).is_ok());
        assert!(fresh.advance(byte(b'b')).is_err(), "'cb' is not allowed");
        assert!(a.advance(byte(b'b')).unwrap(), "'ab' completes the choice");
    }
}
