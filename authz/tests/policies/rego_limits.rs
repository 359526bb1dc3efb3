//! The Rego time limit bounds evaluation for real: a policy that loops is
//! stopped by regorus's execution timer, the request is denied with
//! `rego_timeout` (fail closed), and the engine serves the next request.

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};

use rampart_authz::{Authorizer, Decision, DenyReason, Options};
use support::get;

const WEB: &str = "spiffe://example.org/ns/prod/web";

/// 8e9 comprehension steps on `/loop`: hours of work without a limit.
const LOOPING: &str = r#"policies:
  - name: loops
    kind: rego
    rego: |
      package envoy.authz
      import rego.v1
      default allow := false
      allow if {
        input.attributes.request.http.path == "/loop"
        n := count({[a, b, c] |
          some a in numbers.range(1, 2000)
          some b in numbers.range(1, 2000)
          some c in numbers.range(1, 2000)
        })
        n > 0
      }
      allow if input.attributes.request.http.path == "/ok"
"#;

#[test]
fn a_looping_policy_is_stopped_at_the_timeout_and_denied() {
    let options = Options {
        rego_timeout: Duration::from_millis(50),
        ..Options::default()
    };
    let a = Authorizer::from_yaml("loops.yaml", LOOPING, Path::new("."), &options)
        .unwrap_or_else(|e| panic!("{e}"));
    for round in 0..2 {
        let started = Instant::now();
        match get("/loop").from(WEB).check(&a) {
            Some(Decision::Deny(d)) => {
                assert_eq!(d.reason, DenyReason::RegoTimeout, "round {round}: {d:?}");
                assert_eq!(d.reason.as_str(), "rego_timeout");
                assert_eq!(d.policy.as_deref(), Some("loops"));
            }
            other => panic!("round {round}: {other:?}"),
        }
        // Not a speed claim: unbounded, this evaluation would run for hours;
        // the limit is what makes it return at all.
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the time limit did not stop the evaluation"
        );
        // The engine that timed out serves the next request normally.
        assert!(get("/ok").from(WEB).allowed(&a), "round {round}");
    }
}

#[test]
fn a_fast_policy_is_not_affected_by_a_tight_timeout() {
    let options = Options {
        rego_timeout: Duration::from_millis(50),
        ..Options::default()
    };
    let a = Authorizer::from_yaml("loops.yaml", LOOPING, Path::new("."), &options).unwrap();
    for _ in 0..100 {
        assert!(get("/ok").from(WEB).allowed(&a));
        assert!(!get("/other").from(WEB).allowed(&a));
    }
}
