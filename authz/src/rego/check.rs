//! Load-time analysis of Rego modules: every function a module calls must
//! exist. regorus resolves a call only when evaluation reaches it, so a
//! policy calling a builtin Rampart lacks would load and then fail every
//! request that reaches the call; this walk refuses it at load instead,
//! naming the builtin, the file, the line and the column.
//!
//! A call resolves as regorus (and OPA) resolve it: a leading import alias
//! first, then a function of the module's own package, then `data.` paths,
//! then builtins and this crate's extensions.

use std::collections::BTreeSet;

use regorus::unstable::{Expr, Literal, Parser, Query, Rule, RuleHead, Source};

use crate::model::RegoVersion;

/// Builtins that regorus registers but that Rampart must not run, because
/// they would decide differently from OPA: refused at load, with the reason.
pub(crate) const REFUSED: &[(&str, &str)] = &[
    (
        "http.send",
        "Rampart does not make HTTP calls from policies (no timeout, cache, size cap or allow-list yet)",
    ),
    (
        "opa.runtime",
        "Rampart is not OPA: its runtime document (version, config, env) would differ",
    ),
];

/// A call to a function that does not exist, or must not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingBuiltin {
    /// The function as called (`io.jwt.decode`, `data.lib.f`).
    pub name: String,
    /// The module (file) that calls it.
    pub file: String,
    /// 1-based line.
    pub line: u32,
    /// 1-based column.
    pub column: u32,
    /// Why it cannot run, when Rampart knows the function but refuses it.
    pub reason: Option<&'static str>,
}

impl std::fmt::Display for MissingBuiltin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason {
            Some(r) => write!(
                f,
                "{}:{}:{}: builtin {} is refused: {r}",
                self.file, self.line, self.column, self.name
            ),
            None => write!(
                f,
                "{}:{}:{}: function {} is not supported by Rampart (not a regorus builtin, a Rampart extension or a function of the policy)",
                self.file, self.line, self.column, self.name
            ),
        }
    }
}

/// Parses `modules` (name, source, version) and returns every call that
/// does not resolve, in source order. A module that does not parse is left
/// to the engine, which reports the syntax error.
pub(crate) fn missing_builtins(
    modules: &[(String, String, RegoVersion)],
    extensions: &[&str],
) -> Vec<MissingBuiltin> {
    let mut parsed = Vec::new();
    for (name, src, version) in modules {
        let Ok(source) = Source::from_contents(name.clone(), src.clone()) else {
            continue;
        };
        let Ok(mut parser) = Parser::new(&source) else {
            continue;
        };
        if *version == RegoVersion::V1 && parser.enable_rego_v1().is_err() {
            continue;
        }
        if let Ok(m) = parser.parse() {
            parsed.push((name.clone(), m));
        }
    }
    // Every function any module defines, as `data.<package>.<name>`.
    let mut functions = BTreeSet::new();
    for (_, m) in &parsed {
        let Some(pkg) = path_of(&m.package.refr) else {
            continue;
        };
        for rule in &m.policy {
            let head = match rule.as_ref() {
                Rule::Spec {
                    head: RuleHead::Func { refr, .. },
                    ..
                } => Some(refr),
                Rule::Default { refr, args, .. } if !args.is_empty() => Some(refr),
                Rule::Spec { .. } | Rule::Default { .. } => None,
            };
            if let Some(name) = head.and_then(|r| path_of(r)) {
                functions.insert(format!("data.{pkg}.{name}"));
            }
        }
    }
    let builtins = &*regorus::unstable::BUILTINS;
    let mut missing = Vec::new();
    for (file, m) in &parsed {
        let pkg = path_of(&m.package.refr).unwrap_or_default();
        let imports: Vec<(String, String)> = m
            .imports
            .iter()
            .filter_map(|i| {
                let path = path_of(&i.refr)?;
                let alias = match &i.r#as {
                    Some(span) => span.text().to_owned(),
                    None => path.rsplit('.').next()?.to_owned(),
                };
                Some((alias, path))
            })
            .collect();
        let resolve = |called: &str| -> Result<(), Option<&'static str>> {
            let (head, rest) = match called.split_once('.') {
                Some((h, r)) => (h, Some(r)),
                None => (called, None),
            };
            if let Some((_, target)) = imports.iter().find(|(alias, _)| alias == head) {
                let full = match rest {
                    Some(r) => format!("{target}.{r}"),
                    None => target.clone(),
                };
                return if functions.contains(&full) {
                    Ok(())
                } else {
                    Err(None)
                };
            }
            if functions.contains(&format!("data.{pkg}.{called}")) {
                return Ok(());
            }
            if called.starts_with("data.") {
                return if functions.contains(called) {
                    Ok(())
                } else {
                    Err(None)
                };
            }
            if let Some((_, reason)) = REFUSED.iter().find(|(n, _)| *n == called) {
                return Err(Some(reason));
            }
            if called == "print" || builtins.contains_key(called) || extensions.contains(&called) {
                return Ok(());
            }
            Err(None)
        };
        let mut calls = Vec::new();
        for rule in &m.policy {
            walk_rule(rule, &mut calls);
        }
        for (name, line, column) in calls {
            if let Err(reason) = resolve(&name) {
                missing.push(MissingBuiltin {
                    name,
                    file: file.clone(),
                    line,
                    column,
                    reason,
                });
            }
        }
    }
    missing
}

/// The package of one module, `None` when it does not parse.
pub(crate) fn package_of(name: &str, src: &str, version: RegoVersion) -> Option<String> {
    let source = Source::from_contents(name.to_owned(), src.to_owned()).ok()?;
    let mut parser = Parser::new(&source).ok()?;
    if version == RegoVersion::V1 {
        parser.enable_rego_v1().ok()?;
    }
    let m = parser.parse().ok()?;
    path_of(&m.package.refr)
}

/// Whether `query` (`data.a.b`) names a rule, a document built from rules
/// under it, or a part of a rule's value, in `modules`.
pub(crate) fn declares(modules: &[(String, String, RegoVersion)], query: &str) -> bool {
    for (name, src, version) in modules {
        let Ok(source) = Source::from_contents(name.clone(), src.clone()) else {
            continue;
        };
        let Ok(mut parser) = Parser::new(&source) else {
            continue;
        };
        if *version == RegoVersion::V1 && parser.enable_rego_v1().is_err() {
            continue;
        }
        let Ok(m) = parser.parse() else {
            continue;
        };
        let Some(pkg) = path_of(&m.package.refr) else {
            continue;
        };
        for rule in &m.policy {
            let refr = match rule.as_ref() {
                Rule::Spec {
                    head: RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. },
                    ..
                } => refr,
                Rule::Default { refr, args, .. } if args.is_empty() => refr,
                Rule::Spec { .. } | Rule::Default { .. } => continue,
            };
            let Some(head) = path_of(refr) else {
                continue;
            };
            let path = format!("data.{pkg}.{head}");
            if path == query
                || path.starts_with(&format!("{query}."))
                || query.starts_with(&format!("{path}."))
            {
                return true;
            }
        }
    }
    false
}

/// A dotted path (`a.b.c`, `a["b"]`) from a reference, `None` for a
/// dynamic one.
fn path_of(e: &Expr) -> Option<String> {
    match e {
        Expr::Var { span, .. } => Some(span.text().to_owned()),
        Expr::RefDot { refr, field, .. } => Some(format!("{}.{}", path_of(refr)?, field.0.text())),
        Expr::RefBrack { refr, index, .. } => match index.as_ref() {
            Expr::String { value, .. } => {
                Some(format!("{}.{}", path_of(refr)?, value.as_string().ok()?))
            }
            _ => None,
        },
        _ => None,
    }
}

type Calls = Vec<(String, u32, u32)>;

/// The leftmost term of a reference (`net` in `net.lookup_ip_addr`).
fn root_of(e: &Expr) -> &Expr {
    match e {
        Expr::RefDot { refr, .. } | Expr::RefBrack { refr, .. } => root_of(refr),
        other => other,
    }
}

fn walk_rule(rule: &Rule, calls: &mut Calls) {
    match rule {
        Rule::Spec { head, bodies, .. } => {
            match head {
                RuleHead::Compr { refr, assign, .. } => {
                    walk_expr(refr, calls);
                    if let Some(a) = assign {
                        walk_expr(&a.value, calls);
                    }
                }
                RuleHead::Set { refr, key, .. } => {
                    walk_expr(refr, calls);
                    if let Some(k) = key {
                        walk_expr(k, calls);
                    }
                }
                RuleHead::Func {
                    args, assign, refr, ..
                } => {
                    // The head names the function; only its brackets and
                    // its arguments can call anything.
                    walk_ref_indexes(refr, calls);
                    for a in args {
                        walk_expr(a, calls);
                    }
                    if let Some(a) = assign {
                        walk_expr(&a.value, calls);
                    }
                }
            }
            for b in bodies {
                if let Some(a) = &b.assign {
                    walk_expr(&a.value, calls);
                }
                walk_query(&b.query, calls);
            }
        }
        Rule::Default {
            refr, args, value, ..
        } => {
            walk_ref_indexes(refr, calls);
            for a in args {
                walk_expr(a, calls);
            }
            walk_expr(value, calls);
        }
    }
}

fn walk_ref_indexes(e: &Expr, calls: &mut Calls) {
    match e {
        Expr::RefDot { refr, .. } => walk_ref_indexes(refr, calls),
        Expr::RefBrack { refr, index, .. } => {
            walk_ref_indexes(refr, calls);
            walk_expr(index, calls);
        }
        _ => {}
    }
}

fn walk_query(q: &Query, calls: &mut Calls) {
    for stmt in &q.stmts {
        match &stmt.literal {
            Literal::SomeVars { .. } => {}
            Literal::SomeIn {
                key,
                value,
                collection,
                ..
            } => {
                if let Some(k) = key {
                    walk_expr(k, calls);
                }
                walk_expr(value, calls);
                walk_expr(collection, calls);
            }
            Literal::Expr { expr, .. } | Literal::NotExpr { expr, .. } => walk_expr(expr, calls),
            Literal::Every { domain, query, .. } => {
                walk_expr(domain, calls);
                walk_query(query, calls);
            }
        }
        for w in &stmt.with_mods {
            // `with f as g`: `g` may be a function reference; a call inside
            // `as` is still a call.
            walk_expr(&w.r#as, calls);
        }
    }
}

fn walk_expr(e: &Expr, calls: &mut Calls) {
    match e {
        Expr::String { .. }
        | Expr::RawString { .. }
        | Expr::Number { .. }
        | Expr::Bool { .. }
        | Expr::Null { .. }
        | Expr::Var { .. } => {}
        Expr::Array { items, .. } | Expr::Set { items, .. } => {
            for i in items {
                walk_expr(i, calls);
            }
        }
        Expr::Object { fields, .. } => {
            for (_, k, v) in fields {
                walk_expr(k, calls);
                walk_expr(v, calls);
            }
        }
        Expr::ArrayCompr { term, query, .. } | Expr::SetCompr { term, query, .. } => {
            walk_expr(term, calls);
            walk_query(query, calls);
        }
        Expr::ObjectCompr {
            key, value, query, ..
        } => {
            walk_expr(key, calls);
            walk_expr(value, calls);
            walk_query(query, calls);
        }
        Expr::Call { fcn, params, .. } => {
            match path_of(fcn) {
                // The call's own span starts at its parenthesis; the
                // function's name starts where a reader looks.
                Some(name) => {
                    let root = root_of(fcn);
                    calls.push((name, root.span().line, root.span().col));
                }
                None => walk_expr(fcn, calls),
            }
            for p in params {
                walk_expr(p, calls);
            }
        }
        Expr::UnaryExpr { expr, .. } => walk_expr(expr, calls),
        Expr::RefDot { refr, .. } => walk_expr(refr, calls),
        Expr::RefBrack { refr, index, .. } => {
            walk_expr(refr, calls);
            walk_expr(index, calls);
        }
        Expr::BinExpr { lhs, rhs, .. }
        | Expr::BoolExpr { lhs, rhs, .. }
        | Expr::ArithExpr { lhs, rhs, .. }
        | Expr::AssignExpr { lhs, rhs, .. } => {
            walk_expr(lhs, calls);
            walk_expr(rhs, calls);
        }
        Expr::Membership {
            key,
            value,
            collection,
            ..
        } => {
            if let Some(k) = key {
                walk_expr(k, calls);
            }
            walk_expr(value, calls);
            walk_expr(collection, calls);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(src: &str) -> Vec<String> {
        let modules = vec![("p.rego".to_owned(), src.to_owned(), RegoVersion::V1)];
        let ext: Vec<&str> = super::super::builtins::EXTENSIONS
            .iter()
            .map(|(n, _)| *n)
            .collect();
        missing_builtins(&modules, &ext)
            .into_iter()
            .map(|m| format!("{}@{}:{}", m.name, m.line, m.column))
            .collect()
    }

    #[test]
    fn unknown_builtins_are_found_with_their_position() {
        let src =
            "package p\n\nallow if {\n  x := net.lookup_ip_addr(\"a\")\n  count([1]) == 1\n}\n";
        assert_eq!(check(src), ["net.lookup_ip_addr@4:8"]);
    }

    #[test]
    fn own_functions_imports_and_extensions_resolve() {
        let src = "package p\nimport data.lib\n\nf(x) := y if { y := x }\n\nallow if {\n  f(1) == 1\n  lib.g(2)\n  io.jwt.decode(\"a.b.c\")\n  data.p.f(3) == 3\n}\n";
        // lib.g is not defined anywhere: refused, as OPA's compiler would.
        assert_eq!(check(src), ["lib.g@8:3"]);
    }

    #[test]
    fn refused_builtins_name_their_reason() {
        let modules = vec![(
            "p.rego".to_owned(),
            "package p\nallow if { http.send({\"url\": \"x\"}) }\n".to_owned(),
            RegoVersion::V1,
        )];
        let m = missing_builtins(&modules, &[]);
        assert_eq!(m.len(), 1);
        assert!(
            m[0].to_string()
                .starts_with("p.rego:2:12: builtin http.send is refused")
        );
    }
}
