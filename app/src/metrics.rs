//! The metrics the application crate itself records (the data plane's are
//! in `rampart_proxy::metrics`): names, units, descriptions, and label
//! values from closed enums.

use metrics::{counter, describe_counter};

use crate::istio_kube::IstioKind;

/// Istio resources from the Kubernetes API that Rampart refused, one count
/// per version refused; label `kind`.
pub const ISTIO_RESOURCES_REFUSED: &str = "rampart_istio_resources_refused_total";

/// Counts one refused version of an Istio resource.
pub fn istio_resource_refused(kind: IstioKind) {
    counter!(ISTIO_RESOURCES_REFUSED, "kind" => kind.as_str()).increment(1);
}

/// Describes the metrics above to the installed recorder.
pub fn describe() {
    describe_counter!(
        ISTIO_RESOURCES_REFUSED,
        "Istio resources read from the Kubernetes API that did not load (each version once), by kind"
    );
}
