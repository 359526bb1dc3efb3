//! One PKI for every test: a development CA made in process
//! ([`rampart_identity::ca::DevCa`], the CA behind `rampart ca`), which
//! issues SVIDs in memory (for handshakes over `tokio::io::duplex`) or as
//! the PEM files a sidecar's `identity.files` reads, in the layout
//! `rampart ca issue` writes (`svid.pem`, `svid.key`, `bundle.pem`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rampart_identity::bundle::BundleSet;
use rampart_identity::ca::{DevCa, IssuedCert, IssuedSvid, write_with_mode};
use rampart_identity::{SpiffeId, TrustDomain};

/// How long the CA and its SVIDs live unless a test says otherwise.
pub const TTL: Duration = Duration::from_secs(3600);

/// A development CA for one trust domain and its bundle.
pub struct Pki {
    ca: DevCa,
    bundles: BundleSet,
}

impl Pki {
    /// A new CA for `trust_domain` (such as `example.org`).
    pub fn new(trust_domain: &str) -> Pki {
        let td = TrustDomain::parse(trust_domain).expect("a valid test trust domain");
        let ca = DevCa::generate(&td, TTL).expect("generate the test CA");
        let mut bundles = BundleSet::new();
        bundles.insert(ca.bundle().expect("the test CA's bundle"));
        Pki { ca, bundles }
    }

    /// The CA.
    pub fn ca(&self) -> &DevCa {
        &self.ca
    }

    /// The trust bundles: this CA's.
    pub fn bundles(&self) -> &BundleSet {
        &self.bundles
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// An SVID for `id`, in memory.
    pub fn svid(&self, id: &str) -> IssuedSvid {
        self.ca
            .issue(&parse_id(id), TTL)
            .unwrap_or_else(|e| panic!("issue {id}: {e}"))
    }

    /// A client certificate with only DNS SANs (an ingress outside the mesh).
    pub fn dns_client(&self, names: &[&str]) -> IssuedCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.ca
            .issue_dns_client(&names, TTL)
            .expect("issue a DNS-SAN client certificate")
    }

    /// A server certificate with only DNS SANs (an ACM PCA or file
    /// certificate), for server and client auth.
    pub fn dns_server(&self, names: &[&str]) -> IssuedCert {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        self.ca
            .issue_dns_server(&names, TTL)
            .expect("issue a DNS-SAN server certificate")
    }

    /// Writes an SVID for `id` into `dir` (created), as `rampart ca issue`
    /// does: `svid.pem`, `svid.key` (0600) and `bundle.pem`; returns `dir`.
    pub fn issue_into(&self, id: &str, dir: &Path) -> PathBuf {
        self.issue_into_with_dns(id, &[], dir)
    }

    /// [`Pki::issue_into`] with extra DNS SANs on the SVID (for peers that
    /// check names, not SPIFFE IDs: nginx, HAProxy).
    pub fn issue_into_with_dns(&self, id: &str, dns: &[&str], dir: &Path) -> PathBuf {
        let dns: Vec<String> = dns.iter().map(|d| d.to_string()).collect();
        let issued = self
            .ca
            .issue_with(&parse_id(id), TTL, &dns)
            .unwrap_or_else(|e| panic!("issue {id}: {e}"));
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        write(&dir.join("svid.pem"), &issued.chain_pem, 0o644);
        write(&dir.join("svid.key"), &issued.key_pem, 0o600);
        write(&dir.join("bundle.pem"), self.ca.cert_pem(), 0o644);
        dir.to_owned()
    }

    /// Saves the CA into `dir` as `rampart ca init` does, for tests of the
    /// CLI and of `identity.dev_ca`.
    pub fn save_ca(&self, dir: &Path) {
        self.ca
            .save(dir)
            .unwrap_or_else(|e| panic!("save the CA into {}: {e}", dir.display()));
    }
}

/// A SPIFFE ID a test wrote: panics on a typo, naming it.
pub fn parse_id(id: &str) -> SpiffeId {
    SpiffeId::parse(id).unwrap_or_else(|e| panic!("test SPIFFE ID {id:?}: {e}"))
}

fn write(path: &Path, contents: &str, mode: u32) {
    write_with_mode(path, contents, mode)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
