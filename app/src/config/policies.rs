//! The inbound policies a configuration puts in force: the policy files
//! (native YAML or Rego wrappers), or the per-port allowlists when there
//! are none, compiled with the options of `inbound.default_action`.

use rampart_authz::{Authorizer, DefaultAction};

use rampart_proxy::config::{DeclaredProtocol, Direction};

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
            return self.with_istio(Authorizer::from_port_allowlist(
                self.inbound
                    .ports
                    .iter()
                    .filter_map(|p| Some((p.port, p.allowed_peers.clone()?))),
                options.default_action,
            ));
        }
        let native =
            Authorizer::load(&self.inbound.policies, &options).map_err(|e| ConfigError {
                problems: e.to_string().lines().map(str::to_owned).collect(),
            })?;
        self.with_istio(native)
    }

    /// Adds the Istio resources of `inbound.istio`, if any: its files and
    /// the objects read from the Kubernetes API so far.
    fn with_istio(&self, native: Authorizer) -> Result<Authorizer, ConfigError> {
        let Some(istio) = &self.inbound.istio else {
            return Ok(native);
        };
        let objects = istio.api_objects.current();
        let set = self.istio_set(istio, &istio.files, &objects)?;
        native
            .with_istio(set)
            .map_err(|m| problem(format!("inbound.istio: {m}")))
    }

    /// Compiles the Istio resources in `files` and `objects` (`(origin,
    /// YAML)`) for this workload as one set; a CUSTOM policy must name a
    /// provider of `ext_authz.providers`.
    pub fn istio_set(
        &self,
        istio: &super::IstioConfig,
        files: &[std::path::PathBuf],
        objects: &[(String, String)],
    ) -> Result<rampart_authz::istio::IstioPolicies, ConfigError> {
        let set =
            rampart_authz::istio::IstioPolicies::load_with(files, objects, &istio.workload(self))
                .map_err(|e| problem(e.to_string()))?;
        for name in set.custom_providers() {
            if !self
                .ext_authz
                .providers
                .iter()
                .any(|p| p.name == name.as_str())
            {
                return Err(problem(format!(
                    "inbound.istio: a CUSTOM policy names provider {name:?}, which is not in ext_authz.providers"
                )));
            }
        }
        Ok(set)
    }

    /// Inbound ports that may carry opaque TCP (declared `detect` or
    /// `opaque`); `None` when any port may (transparent capture).
    pub(super) fn istio_tcp_ports(&self) -> Option<Vec<u16>> {
        if self.transparent.is_some() {
            return None;
        }
        let declared = |port: u16| self.inbound.ports.iter().find(|p| p.port == port);
        let mut ports: Vec<u16> = self
            .listeners
            .iter()
            .filter(|l| matches!(l.direction, Direction::Inbound))
            .map(|l| l.policy_port())
            .filter(|&port| {
                matches!(
                    declared(port).map(|p| p.protocol),
                    None | Some(DeclaredProtocol::Detect | DeclaredProtocol::Opaque)
                )
            })
            .collect();
        ports.sort_unstable();
        ports.dedup();
        Some(ports)
    }

    /// The policy files and Istio files, as the policy watcher polls them.
    pub fn policy_files(&self) -> Vec<std::path::PathBuf> {
        let istio = self
            .inbound
            .istio
            .iter()
            .flat_map(|i| i.files.iter().cloned());
        self.inbound.policies.iter().cloned().chain(istio).collect()
    }

    /// The policies in force at start: the policy files (or allowlists);
    /// with a bundle, the local fallback if there are policy files, else
    /// `None` (nothing is in force until the first bundle). Compiled on a
    /// thread of its own within `inbound.policy_budget`: a file over budget
    /// is a configuration error, as a broken one is, rather than a sidecar
    /// that never starts.
    ///
    /// With Istio resources from the Kubernetes API the files are checked
    /// now, but nothing is in force (and the sidecar is not ready) until
    /// the API's first lists load: `None`.
    pub fn initial_policies(&self) -> Result<Option<Authorizer>, ConfigError> {
        if self.inbound.bundle.is_some() && self.inbound.policies.is_empty() {
            return Ok(None);
        }
        let from_api = self
            .inbound
            .istio
            .as_ref()
            .is_some_and(|i| i.kubernetes.is_some());
        let budget = self.inbound.policy_budget;
        let files = self.policy_files();
        let cfg = self.clone();
        let loader: rampart_proxy::policy::PolicyLoader =
            std::sync::Arc::new(move || cfg.authorizer().map_err(|e| e.to_string()));
        rampart_proxy::policy::load_within(&budget, &files, &loader)
            .map(|a| (!from_api).then_some(a))
            .map_err(|e| ConfigError {
                problems: e.to_string().lines().map(str::to_owned).collect(),
            })
    }
}

fn problem(m: String) -> ConfigError {
    ConfigError {
        problems: m.lines().map(str::to_owned).collect(),
    }
}
