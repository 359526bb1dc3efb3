//! The `discovery` section of the configuration file (docs/config.md).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where endpoints and their identities come from; every source is
/// optional, and with none the sidecar routes by `outbound` rules only.
/// A destination two sources claim goes to the first in this order:
/// `file`, `kubernetes`, `dns`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// A static endpoints file, reloaded on change.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Names resolved through DNS, refreshed by TTL.
    #[serde(default)]
    pub dns: Option<crate::dns::DnsConfig>,
    /// Services, EndpointSlices and Pods through the Kubernetes API server,
    /// followed from the first dial of each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<crate::kubernetes::KubernetesConfig>,
    /// How long the first connection to an address no source knows waits
    /// for a demand-driven source (Kubernetes) to look it up.
    #[serde(default = "d_demand_wait", with = "duration_ms")]
    pub demand_wait_ms: Duration,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            file: None,
            dns: None,
            kubernetes: None,
            demand_wait_ms: d_demand_wait(),
        }
    }
}

fn d_demand_wait() -> Duration {
    Duration::from_secs(2)
}

pub(crate) mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl DiscoveryConfig {
    /// Whether any source is configured.
    pub fn any(&self) -> bool {
        self.file.is_some() || self.dns.is_some() || self.kubernetes.is_some()
    }

    /// Every problem of the fields, as (field path, reason); the file
    /// itself is checked by [`crate::file::load`].
    pub fn validate(&self) -> Vec<(String, String)> {
        let mut p = self.dns.as_ref().map(|d| d.validate()).unwrap_or_default();
        if let Some(k) = &self.kubernetes {
            p.extend(k.validate());
        }
        p
    }
}
