//! A guard that runs before regorus sees a module: its bracket nesting
//! depth. regorus's parser (0.14) takes time exponential in the nesting of
//! brackets, about doubling with each level, closed or not (issue 19, R1:
//! `package p` then `x := [[[[[[[[[[[[[[[[[[[[` with 20 `[` took 23 s, 20
//! `{` 41 s); a sidecar must refuse such a file at once whatever the
//! upstream parser does. Real policies nest a handful of levels.

/// The deepest bracket nesting (`(`, `[`, `{` together) a Rego module may
/// have. Policies in OPA's and Istio's documentation nest 5 or 6 levels;
/// regorus parses 12 in a quarter of a second in a debug build (16: 5 to
/// 12 s; `measure_regorus_parse_time_by_nesting` below prints the curve).
pub const MAX_REGO_NESTING: usize = 12;

/// Where a module first nests deeper than allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooDeep {
    /// 1-based line of the bracket that goes past the limit.
    pub line: usize,
    /// 1-based column (in characters) of that bracket.
    pub column: usize,
    /// The limit.
    pub limit: usize,
}

impl std::fmt::Display for TooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: brackets nest deeper than {} levels (refused before parsing)",
            self.line, self.column, self.limit
        )
    }
}

/// Checks that `source` never nests brackets deeper than `limit`, skipping
/// comments (`#` to the end of the line), strings (`"..."` with `\`
/// escapes) and raw strings (`` `...` ``), whose brackets are text. An
/// unbalanced file passes here; the parser reports it.
pub fn check_nesting(source: &str, limit: usize) -> Result<(), TooDeep> {
    #[derive(Clone, Copy)]
    enum State {
        Code,
        Comment,
        Str { escaped: bool },
        Raw,
    }
    let mut state = State::Code;
    let mut depth = 0usize;
    let (mut line, mut column) = (1usize, 0usize);
    for c in source.chars() {
        if c == '\n' {
            line += 1;
            column = 0;
        } else {
            column += 1;
        }
        state = match (state, c) {
            (State::Comment, '\n') => State::Code,
            (State::Comment, _) => State::Comment,
            (State::Str { escaped: true }, _) => State::Str { escaped: false },
            (State::Str { escaped: false }, '\\') => State::Str { escaped: true },
            (State::Str { escaped: false }, '"') => State::Code,
            // A string does not span lines in Rego; the parser reports it.
            (State::Str { .. }, '\n') => State::Code,
            (State::Str { .. }, _) => State::Str { escaped: false },
            (State::Raw, '`') => State::Code,
            (State::Raw, _) => State::Raw,
            (State::Code, '#') => State::Comment,
            (State::Code, '"') => State::Str { escaped: false },
            (State::Code, '`') => State::Raw,
            (State::Code, '(' | '[' | '{') => {
                depth += 1;
                if depth > limit {
                    return Err(TooDeep {
                        line,
                        column,
                        limit,
                    });
                }
                State::Code
            }
            (State::Code, ')' | ']' | '}') => {
                depth = depth.saturating_sub(1);
                State::Code
            }
            (State::Code, _) => State::Code,
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(open: &str, close: &str, n: usize) -> String {
        format!("package p\n\nx := {}1{}\n", open.repeat(n), close.repeat(n))
    }

    #[test]
    fn nesting_up_to_the_limit_passes_and_one_more_is_refused_with_its_position() {
        for (open, close) in [("[", "]"), ("{", "}"), ("(", ")")] {
            assert_eq!(check_nesting(&nested(open, close, 16), 16), Ok(()));
            assert_eq!(
                check_nesting(&nested(open, close, 17), 16),
                Err(TooDeep {
                    line: 3,
                    column: 6 + 16,
                    limit: 16
                })
            );
        }
        // Mixed brackets count together; unclosed ones too.
        let mixed = format!("package p\nx := {}", "[{(".repeat(6));
        assert!(check_nesting(&mixed, 16).is_err());
    }

    #[test]
    fn brackets_in_comments_and_strings_do_not_count() {
        let deep = "[".repeat(40);
        for src in [
            format!("package p\n# {deep}\nx := 1\n"),
            format!("package p\nx := \"{deep}\"\n"),
            format!("package p\nx := \"\\\"{deep}\"\n"),
            format!("package p\nx := `{deep}\n{deep}`\n"),
        ] {
            assert_eq!(check_nesting(&src, 16), Ok(()), "{src}");
        }
        // Closing brackets in code are counted after a string ends.
        let after = format!("package p\nx := \"]]]]\" {}", "[".repeat(17));
        assert!(check_nesting(&after, 16).is_err());
    }

    #[test]
    fn real_policies_pass() {
        let src = r#"package envoy.authz
import rego.v1
default allow := false
allow if {
    some i
    input.attributes.request.http.headers[sprintf("x-%s", [lower("A")])] == "1"
    glob.match("/api/*", ["/"], input.parsed_path[i])
    {"a": [{"b": [1, 2]}]}.a[0].b[1] == 2
}
"#;
        assert_eq!(check_nesting(src, MAX_REGO_NESTING), Ok(()));
    }

    /// Prints how long regorus takes to parse `x := [[...1...]]` by depth
    /// (and `{`, and an unclosed run), the figures behind the limit:
    /// `cargo test -p rampart-authz --release measure_regorus -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check (run it by name)"]
    fn measure_regorus_parse_time_by_nesting() {
        let budget = std::time::Duration::from_secs(4);
        for (label, open, close) in [
            ("[", "[", "]"),
            ("{", "{\"a\": ", "}"),
            ("unclosed [", "[", ""),
        ] {
            for n in (2..=30).step_by(2) {
                let src = format!("package p\n\nx := {}1{}\n", open.repeat(n), close.repeat(n));
                let start = std::time::Instant::now();
                let mut engine = regorus::Engine::new();
                let ok = engine.add_policy("p.rego".into(), src).is_ok();
                let took = start.elapsed();
                println!("{label:>10} depth {n:>2}: {took:>12.3?} (parsed: {ok})");
                if took > budget {
                    break;
                }
            }
        }
    }
}
