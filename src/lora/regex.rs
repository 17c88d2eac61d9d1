//! A small backtracking matcher for the subset of Python's `re` that PEFT's module-name patterns
//! use (`target_modules`, `exclude_modules`, `rank_pattern`, `alpha_pattern`; see lora/config.rs):
//! literals, `.`, classes `[...]` (ranges, negation, `\d \w \s`), groups `(...)` / `(?:...)`,
//! alternation `|`, the quantifiers `* + ? {m} {m,} {m,n}` (greedy, or lazy with `?`), anchors
//! `^ $`, and escapes `\d \D \w \W \s \S \.` etc. Anything else (look-arounds,
//! back-references, named groups, flags) is an error that says so, never a silent mismatch.
//! Patterns and names are ASCII in practice; matching is on bytes.

use crate::{Error, Result};

#[derive(Clone, Debug)]
enum Node {
    Byte(u8),
    /// `.`: any byte but a newline.
    Any,
    /// `[...]`: inclusive byte ranges, negated or not.
    Class(Vec<(u8, u8)>, bool),
    Start,
    End,
    /// A group: its alternatives.
    Group(Vec<Vec<Node>>),
    /// node, min, max (None: unbounded), greedy.
    Repeat(Box<Node>, usize, Option<usize>, bool),
}

/// A compiled pattern.
#[derive(Clone, Debug)]
pub struct Regex {
    alts: Vec<Vec<Node>>,
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    pat: &'a str,
}

const DIGIT: &[(u8, u8)] = &[(b'0', b'9')];
const WORD: &[(u8, u8)] = &[(b'a', b'z'), (b'A', b'Z'), (b'0', b'9'), (b'_', b'_')];
const SPACE: &[(u8, u8)] = &[(b' ', b' '), (b'\t', b'\r')];

impl Parser<'_> {
    fn err(&self, what: &str) -> Error {
        Error::Invalid(format!("regular expression {:?} at position {}: {what}", self.pat, self.i))
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn alt(&mut self) -> Result<Vec<Vec<Node>>> {
        let mut alts = vec![self.seq()?];
        while self.peek() == Some(b'|') {
            self.i += 1;
            alts.push(self.seq()?);
        }
        Ok(alts)
    }
    fn seq(&mut self) -> Result<Vec<Node>> {
        let mut seq = Vec::new();
        while let Some(c) = self.peek() {
            if c == b'|' || c == b')' {
                break;
            }
            let atom = self.atom()?;
            let atom = self.quantifier(atom)?;
            seq.push(atom);
        }
        Ok(seq)
    }
    fn escape_class(c: u8) -> Option<(&'static [(u8, u8)], bool)> {
        match c {
            b'd' => Some((DIGIT, false)),
            b'D' => Some((DIGIT, true)),
            b'w' => Some((WORD, false)),
            b'W' => Some((WORD, true)),
            b's' => Some((SPACE, false)),
            b'S' => Some((SPACE, true)),
            _ => None,
        }
    }
    fn atom(&mut self) -> Result<Node> {
        let c = self.peek().unwrap();
        self.i += 1;
        Ok(match c {
            b'(' => {
                if self.s[self.i..].starts_with(b"?:") {
                    self.i += 2;
                } else if self.peek() == Some(b'?') {
                    return Err(self.err("extension groups (?...) other than (?:...) are not supported"));
                }
                let alts = self.alt()?;
                if self.peek() != Some(b')') {
                    return Err(self.err("missing )"));
                }
                self.i += 1;
                Node::Group(alts)
            }
            b'[' => self.class()?,
            b'.' => Node::Any,
            b'^' => Node::Start,
            b'$' => Node::End,
            b'*' | b'+' | b'?' => return Err(self.err("nothing to repeat")),
            b'\\' => {
                let Some(e) = self.peek() else { return Err(self.err("trailing backslash")) };
                self.i += 1;
                if let Some((r, neg)) = Self::escape_class(e) {
                    Node::Class(r.to_vec(), neg)
                } else if e.is_ascii_alphanumeric() {
                    return Err(self.err(&format!("escape \\{} is not supported", e as char)));
                } else {
                    Node::Byte(e)
                }
            }
            _ => Node::Byte(c),
        })
    }
    fn class(&mut self) -> Result<Node> {
        let mut neg = false;
        if self.peek() == Some(b'^') {
            neg = true;
            self.i += 1;
        }
        let mut ranges = Vec::new();
        let mut first = true;
        loop {
            let Some(c) = self.peek() else { return Err(self.err("unterminated [")) };
            self.i += 1;
            if c == b']' && !first {
                break;
            }
            first = false;
            let lo = if c == b'\\' {
                let Some(e) = self.peek() else { return Err(self.err("trailing backslash")) };
                self.i += 1;
                if let Some((r, false)) = Self::escape_class(e) {
                    ranges.extend_from_slice(r);
                    continue;
                }
                if e.is_ascii_alphanumeric() {
                    return Err(self.err(&format!("escape \\{} in a class is not supported", e as char)));
                }
                e
            } else {
                c
            };
            if self.peek() == Some(b'-') && self.s.get(self.i + 1).is_some_and(|&n| n != b']') {
                let hi = self.s[self.i + 1];
                if hi == b'\\' {
                    return Err(self.err("escapes as range ends are not supported"));
                }
                self.i += 2;
                if hi < lo {
                    return Err(self.err("bad character range"));
                }
                ranges.push((lo, hi));
            } else {
                ranges.push((lo, lo));
            }
        }
        Ok(Node::Class(ranges, neg))
    }
    fn number(&mut self) -> Option<usize> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i]).ok()?.parse().ok()
    }
    fn quantifier(&mut self, atom: Node) -> Result<Node> {
        let (min, max) = match self.peek() {
            Some(b'*') => (0, None),
            Some(b'+') => (1, None),
            Some(b'?') => (0, Some(1)),
            Some(b'{') => {
                // Python reads `{` as a literal unless it forms {m}, {m,}, {,n} or {m,n}.
                let save = self.i;
                self.i += 1;
                let min = self.number();
                let (min, max) = if self.peek() == Some(b',') {
                    self.i += 1;
                    (min.unwrap_or(0), self.number())
                } else if let Some(m) = min {
                    (m, Some(m))
                } else {
                    self.i = save;
                    return Ok(atom);
                };
                if self.peek() != Some(b'}') {
                    self.i = save;
                    return Ok(atom);
                }
                if max.is_some_and(|mx| mx < min) {
                    return Err(self.err("min repeat greater than max repeat"));
                }
                (min, max)
            }
            _ => return Ok(atom),
        };
        self.i += 1;
        if matches!(atom, Node::Start | Node::End) {
            return Err(self.err("an anchor cannot be repeated"));
        }
        let greedy = if self.peek() == Some(b'?') {
            self.i += 1;
            false
        } else {
            true
        };
        if matches!(self.peek(), Some(b'*' | b'+' | b'?')) {
            return Err(self.err("multiple repeat"));
        }
        Ok(Node::Repeat(Box::new(atom), min, max, greedy))
    }
}

fn m(nodes: &[Node], s: &[u8], pos: usize, k: &dyn Fn(usize) -> bool) -> bool {
    let Some((first, rest)) = nodes.split_first() else { return k(pos) };
    match first {
        Node::Byte(c) => pos < s.len() && s[pos] == *c && m(rest, s, pos + 1, k),
        Node::Any => pos < s.len() && s[pos] != b'\n' && m(rest, s, pos + 1, k),
        Node::Class(r, neg) => {
            pos < s.len() && (r.iter().any(|&(lo, hi)| (lo..=hi).contains(&s[pos])) != *neg) && m(rest, s, pos + 1, k)
        }
        Node::Start => pos == 0 && m(rest, s, pos, k),
        // Python's `$` also matches right before a final newline.
        Node::End => (pos == s.len() || (pos + 1 == s.len() && s[pos] == b'\n')) && m(rest, s, pos, k),
        Node::Group(alts) => alts.iter().any(|alt| m(alt, s, pos, &|p| m(rest, s, p, k))),
        Node::Repeat(node, min, max, greedy) => rep(node, *min, *max, *greedy, rest, s, pos, 0, k),
    }
}

#[allow(clippy::too_many_arguments)]
fn rep(
    node: &Node,
    min: usize,
    max: Option<usize>,
    greedy: bool,
    rest: &[Node],
    s: &[u8],
    pos: usize,
    count: usize,
    k: &dyn Fn(usize) -> bool,
) -> bool {
    let more = || {
        max.is_none_or(|mx| count < mx)
            // An empty iteration past the minimum cannot change anything: stop there.
            && m(std::slice::from_ref(node), s, pos, &|p| (p != pos || count < min) && rep(node, min, max, greedy, rest, s, p, count + 1, k))
    };
    let stop = || count >= min && m(rest, s, pos, k);
    if greedy {
        more() || stop()
    } else {
        stop() || more()
    }
}

impl Regex {
    /// Compiles `pattern`; an unsupported construct is an error naming it and its position.
    pub fn new(pattern: &str) -> Result<Regex> {
        let mut p = Parser { s: pattern.as_bytes(), i: 0, pat: pattern };
        let alts = p.alt()?;
        if p.i != p.s.len() {
            return Err(p.err("unbalanced )"));
        }
        Ok(Regex { alts })
    }

    /// Python's `re.fullmatch`: the pattern matches the whole of `s`.
    pub fn fullmatch(&self, s: &str) -> bool {
        let b = s.as_bytes();
        self.alts.iter().any(|alt| m(alt, b, 0, &|p| p == b.len()))
    }

    /// Python's `re.match`: the pattern matches a prefix of `s`.
    pub fn match_start(&self, s: &str) -> bool {
        let b = s.as_bytes();
        self.alts.iter().any(|alt| m(alt, b, 0, &|_| true))
    }
}

/// Python-`re` subset matching, exposed for tests: (fullmatch, match-at-start) of `pattern` on `s`.
pub fn regex_matches(pattern: &str, s: &str) -> Result<(bool, bool)> {
    let r = Regex::new(pattern)?;
    Ok((r.fullmatch(s), r.match_start(s)))
}
