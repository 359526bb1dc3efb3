//! The inbound policies a configuration puts in force: the policy files
//! (native YAML or Rego wrappers), or the per-port allowlists when there
//! are none, compiled with the options of `inbound.default_action`.

use rampart_authz::{Authorizer, DefaultAction};

use super::{Config, ConfigError, DefaultPortAction};

impl Config {
    /// How policies (files and bundles) are compiled.
    pub fn policy_options(&self) -> rampart_authz::Options {
        let default_action = match self.inbound.default_action {
            DefaultPortAction::Deny => DefaultAction::Deny,
            DefaultPortAction::AllowAnyAuthenticated => DefaultAction::AllowAnyAuthenticated,
        };
        rampart_authz::Options {
            default_action,
            ..rampart_authz::Options::default()
        }
    }

    /// Loads the inbound policy files, or compiles the per-port allowlists
    /// when there are none. Errors name file, line and field, one a line.
    pub fn authorizer(&self) -> Result<Authorizer, ConfigError> {
        let options = self.policy_options();
        if self.inbound.policies.is_empty() {
            return Ok(Authorizer::from_port_allowlist(
                self.inbound
                    .ports
                    .iter()
                    .filter_map(|p| Some((p.port, p.allowed_peers.clone()?))),
                options.default_action,
            ));
        }
        Authorizer::load(&self.inbound.policies, &options).map_err(|e| ConfigError {
            problems: e.to_string().lines().map(str::to_owned).collect(),
        })
    }

    /// The policies in force at start: the policy files (or allowlists);
    /// with a bundle, the local fallback if there are policy files, else
    /// `None` (nothing is in force until the first bundle).
    pub fn initial_policies(&self) -> Result<Option<Authorizer>, ConfigError> {
        if self.inbound.bundle.is_some() && self.inbound.policies.is_empty() {
            return Ok(None);
        }
        self.authorizer().map(Some)
    }
}
