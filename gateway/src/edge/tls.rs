//! TLS termination: rustls (ring provider) with TLS 1.2 and 1.3 only, the
//! provider's modern AEAD suites only, ALPN `h2` and `http/1.1`, and a
//! certificate chosen per connection by SNI among several PEM pairs.
//!
//! Certificates live in a [`CertStore`] that swaps its whole set atomically:
//! a handshake reads the set once, so connections opened before a reload
//! keep the certificate they negotiated and nothing is dropped. A reload
//! loads every pair first and swaps only when all of them are good; a bad
//! file (missing, unparsable, key not matching the certificate) is refused
//! with a log line and `flashgate_tls_cert_reloads_total{result="error"}`,
//! and the old set keeps serving.
//!
//! A config's pairs are loaded once, into [`Certs`], with errors at their
//! key paths: at start (the store is made from them), by a config reload
//! (which installs them, or is refused) and by `flashgate check`.
//!
//! Each leaf certificate's notAfter is read from its DER
//! ([`super::cert_time`]: rustls and webpki do not expose it) and exported as `flashgate_tls_cert_expiry_seconds{listener,name}`,
//! set again on every load and every reload check (each
//! `reload_interval`), so the gauge counts down while nothing changes and
//! an alert can fire before a forgotten renewal takes a listener down.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, IntGaugeVec};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::config::{CertPair, Config, ConfigError, TlsConfig};

/// Why a certificate pair could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {path}: {message}")]
    Cert { path: String, message: String },
    #[error("cannot read the private key from {path}: {message}")]
    Key { path: String, message: String },
    #[error("{cert} and {key} do not form a usable pair: {source}")]
    Pair {
        cert: String,
        key: String,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS server config: {0}")]
    Config(#[source] rustls::Error),
}

/// The crypto provider every listener uses: ring's, whose suites are the
/// modern ones only (AES-GCM and ChaCha20-Poly1305 with ECDHE; no CBC, no
/// RSA key exchange).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One loaded pair and the DNS names (SANs) it serves.
struct Loaded {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    expiry: Expiry,
}

/// When a leaf certificate stops being valid, and the name it is known by
/// in the expiry gauge.
#[derive(Debug, Clone)]
struct Expiry {
    /// Its first DNS name, else its file.
    name: String,
    /// notAfter, seconds since the Unix epoch.
    not_after: i64,
}

fn load_pair(pair: &CertPair, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
    let cert_path = pair.cert.display().to_string();
    let key_path = pair.key.display().to_string();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&pair.cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Cert {
            path: cert_path,
            message: "no CERTIFICATE block found".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&pair.key).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        message: e.to_string(),
    })?;
    let names: Vec<String> = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            message: format!("not a valid X.509 certificate: {e}"),
        })?
        .valid_dns_names()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    let expiry = Expiry {
        name: names.first().cloned().unwrap_or_else(|| cert_path.clone()),
        not_after: super::cert_time::not_after(&chain[0]).map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            message: format!("cannot read its validity: {e}"),
        })?,
    };
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Pair {
        cert: cert_path,
        key: key_path,
        source,
    })?;
    Ok(Loaded {
        key: Arc::new(key),
        names,
        expiry,
    })
}

/// The certificates of one listener, indexed by name.
#[derive(Debug)]
struct CertSet {
    /// The first pair: clients without SNI or with an unknown name get it.
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is stored under `example.com`: it covers exactly one
    /// more label (RFC 6125 section 6.4.3), so `a.b.example.com` does not
    /// match it.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// Every pair's leaf, in the file's order.
    expiry: Vec<Expiry>,
}

/// Loads every pair; the first that fails comes back with its index.
fn load_all(
    pairs: &[CertPair],
    provider: &CryptoProvider,
) -> Result<Vec<Loaded>, (usize, TlsError)> {
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| load_pair(p, provider).map_err(|e| (i, e)))
        .collect()
}

impl CertSet {
    fn build(pairs: &[CertPair], provider: &CryptoProvider) -> Result<CertSet, TlsError> {
        CertSet::index(load_all(pairs, provider).map_err(|(_, e)| e)?)
    }

    fn index(mut loaded: Vec<Loaded>) -> Result<CertSet, TlsError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // Earlier pairs win a name both cover: the order in the file is the
        // operator's preference.
        for l in &loaded {
            for name in &l.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard
                        .entry(suffix.to_string())
                        .or_insert_with(|| l.key.clone()),
                    None => exact.entry(name.clone()).or_insert_with(|| l.key.clone()),
                };
            }
        }
        if loaded.is_empty() {
            return Err(TlsError::Cert {
                path: "certs".into(),
                message: "no certificate pair configured".into(),
            });
        }
        let expiry = loaded.iter().map(|l| l.expiry.clone()).collect();
        let default = loaded.swap_remove(0).key;
        Ok(CertSet {
            default,
            exact,
            wildcard,
            expiry,
        })
    }

    /// Exact name first, then the wildcard one label up, then the default.
    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

/// One listener's certificate pairs, every one loaded and checked: what a
/// [`CertStore`] serves.
pub struct Certs {
    pairs: Vec<CertPair>,
    set: CertSet,
    /// The files' modification times from just before they were read.
    mtimes: Vec<Option<SystemTime>>,
}

impl Certs {
    /// Loads every pair of `cfg`; the first that fails (missing file, bad
    /// PEM, key not matching its certificate) is an error at
    /// `{path}.certs[N]`.
    pub fn load(cfg: &TlsConfig, path: &str) -> Result<Certs, ConfigError> {
        let stamps = mtimes(&cfg.certs);
        let loaded = load_all(&cfg.certs, &provider())
            .map_err(|(i, e)| ConfigError::at(format!("{path}.certs[{i}]"), e.to_string()))?;
        let set = CertSet::index(loaded)
            .map_err(|e| ConfigError::at(format!("{path}.certs"), e.to_string()))?;
        Ok(Certs {
            pairs: cfg.certs.clone(),
            set,
            mtimes: stamps,
        })
    }

    /// The certificates of every listener of `config`, by listener index
    /// (`None` for a listener without TLS), errors at
    /// `listeners[N].tls.certs[M]`.
    pub fn load_listeners(config: &Config) -> Result<Vec<Option<Certs>>, ConfigError> {
        config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                l.tls
                    .as_ref()
                    .map(|t| Certs::load(t, &format!("listeners[{i}].tls")))
                    .transpose()
            })
            .collect()
    }
}

/// A listener's certificates, swapped whole on reload.
pub struct CertStore {
    listener: String,
    pairs: Vec<CertPair>,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<CertSet>,
    /// Modification times of every cert and key file at the last load.
    mtimes: Mutex<Vec<Option<SystemTime>>>,
    reloads: IntCounterVec,
    expiry: IntGaugeVec,
    /// The names the expiry gauge has series for now.
    exported: Mutex<Vec<String>>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore")
            .field("listener", &self.listener)
            .finish()
    }
}

fn mtimes(pairs: &[CertPair]) -> Vec<Option<SystemTime>> {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    pairs
        .iter()
        .flat_map(|p| [mtime(&p.cert), mtime(&p.key)])
        .collect()
}

impl CertStore {
    /// A store serving `certs` (loaded by [`Certs::load`]) for `listener`;
    /// counts reloads in `reloads` and sets `expiry` (the
    /// `tls_cert_expiry_seconds` gauge).
    pub fn new(
        listener: &str,
        certs: Certs,
        reloads: IntCounterVec,
        expiry: IntGaugeVec,
    ) -> Arc<CertStore> {
        let store = Arc::new(CertStore {
            listener: listener.to_string(),
            pairs: certs.pairs,
            provider: provider(),
            current: ArcSwap::from_pointee(certs.set),
            mtimes: Mutex::new(certs.mtimes),
            reloads,
            expiry,
            exported: Mutex::new(Vec::new()),
        });
        store.export_expiry();
        store
    }

    /// Sets the expiry gauge from the set in effect, now; drops the series
    /// of certificates a reload took away.
    pub fn export_expiry(&self) {
        let set = self.current.load();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut exported = self.exported.lock().unwrap_or_else(|p| p.into_inner());
        for gone in exported
            .iter()
            .filter(|n| !set.expiry.iter().any(|e| e.name == **n))
        {
            let _ = self.expiry.remove_label_values(&[&self.listener, gone]);
        }
        exported.clear();
        for e in &set.expiry {
            self.expiry
                .with_label_values(&[&self.listener, &e.name])
                .set(e.not_after - now);
            exported.push(e.name.clone());
        }
    }

    /// Were `certs` loaded from the files this store serves? A config
    /// reload that kept a listener's pairs has just loaded them, and
    /// [`CertStore::install`]s them instead of reading them again.
    pub fn same_files(&self, certs: &Certs) -> bool {
        self.pairs == certs.pairs
    }

    /// Serves `certs` (from [`CertStore::same_files`]) from now on, counted
    /// and logged like a reload from disk.
    pub fn install(&self, certs: Certs) {
        *self.mtimes.lock().unwrap_or_else(|p| p.into_inner()) = certs.mtimes;
        self.current.store(Arc::new(certs.set));
        self.export_expiry();
        self.reloads
            .with_label_values(&[&self.listener, "ok"])
            .inc();
        tracing::info!(listener = %self.listener, "TLS certificates reloaded");
    }

    /// Re-reads the files when any of them changed (or always, with
    /// `force`). Returns whether a new set was installed. On error the old
    /// set stays and the error is logged and counted.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let stamps = mtimes(&self.pairs);
        {
            let mut last = self.mtimes.lock().unwrap_or_else(|p| p.into_inner());
            if !force && *last == stamps {
                drop(last);
                // Nothing changed, but time passed: the gauge counts down.
                self.export_expiry();
                return Ok(false);
            }
            // Remember these times even when loading fails: a bad file is
            // reported once, not on every poll, and retried when it changes.
            *last = stamps;
        }
        match CertSet::build(&self.pairs, &self.provider) {
            Ok(set) => {
                self.current.store(Arc::new(set));
                self.export_expiry();
                self.reloads
                    .with_label_values(&[&self.listener, "ok"])
                    .inc();
                tracing::info!(listener = %self.listener, "TLS certificates reloaded");
                Ok(true)
            }
            Err(e) => {
                self.reloads
                    .with_label_values(&[&self.listener, "error"])
                    .inc();
                tracing::error!(listener = %self.listener, error = %e, "TLS certificate reload refused; the previous certificates keep serving");
                Err(e)
            }
        }
    }

    /// Polls the files every `interval` until the store is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) {
        let weak: Weak<CertStore> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(store) = weak.upgrade() else { return };
                // Loading reads files and parses keys: keep it off the
                // runtime's worker threads.
                let _ = tokio::task::spawn_blocking(move || store.reload(false)).await;
            }
        });
    }

    /// The rustls server config for this listener: TLS 1.2 + 1.3, ALPN h2
    /// then http/1.1, session resumption by tickets.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Config)?;
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(hello.server_name()))
    }
}

/// A self-signed certificate for `names`, as (cert PEM, key PEM): what
/// `flashgate demo` serves on its TLS port.
pub fn self_signed(names: &[&str]) -> Result<(String, String), rcgen::Error> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;
    Ok((cert.pem(), signing_key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str, sans: &[&str]) -> CertPair {
        let (cert, key) = self_signed(sans).unwrap();
        let pair = CertPair {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&pair.cert, cert).unwrap();
        std::fs::write(&pair.key, key).unwrap();
        pair
    }

    fn tmp(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("fg-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn picks_exact_then_wildcard_then_default() {
        let d = tmp("pick");
        let a = pair(&d, "a", &["a.test", "www.a.test"]);
        let b = pair(&d, "b", &["*.b.test", "b.test"]);
        let set = CertSet::build(&[a, b], &provider()).unwrap();
        let first = set.default.clone();
        let second = set.pick(Some("b.test"));
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(Arc::ptr_eq(&set.pick(Some("WWW.A.test.")), &first));
        assert!(Arc::ptr_eq(&set.pick(Some("x.b.test")), &second));
        // A wildcard covers one label only.
        assert!(Arc::ptr_eq(&set.pick(Some("y.x.b.test")), &first));
        assert!(Arc::ptr_eq(&set.pick(None), &first));
        assert!(Arc::ptr_eq(&set.pick(Some("unknown.test")), &first));
    }

    #[test]
    fn mismatched_key_and_bad_files_are_refused() {
        let d = tmp("bad");
        let a = pair(&d, "a", &["a.test"]);
        let b = pair(&d, "b", &["b.test"]);
        let mixed = CertPair {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        assert!(matches!(
            load_pair(&mixed, &provider()),
            Err(TlsError::Pair { .. })
        ));
        std::fs::write(d.join("junk.pem"), "not a cert").unwrap();
        let junk = CertPair {
            cert: d.join("junk.pem"),
            key: a.key.clone(),
        };
        assert!(matches!(
            load_pair(&junk, &provider()),
            Err(TlsError::Cert { .. })
        ));
        let missing = CertPair {
            cert: d.join("missing.pem"),
            key: a.key.clone(),
        };
        let e = load_pair(&missing, &provider()).err().unwrap().to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }

    #[test]
    fn certs_load_reports_the_failing_pair_at_its_key() {
        let d = tmp("certs");
        let a = pair(&d, "a", &["a.test"]);
        let b = pair(&d, "b", &["b.test"]);
        let mixed = CertPair {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let cfg = |certs: Vec<CertPair>| TlsConfig {
            certs,
            reload_interval: crate::config::Dur(Duration::from_secs(10)),
            handshake_timeout: crate::config::Dur(Duration::from_secs(10)),
        };
        let e = Certs::load(&cfg(vec![a.clone(), mixed]), "listeners[0].tls")
            .err()
            .unwrap();
        assert_eq!(e.path, "listeners[0].tls.certs[1]", "{e}");
        let missing = CertPair {
            cert: d.join("missing.pem"),
            key: a.key.clone(),
        };
        let e = Certs::load(&cfg(vec![missing]), "listeners[0].tls")
            .err()
            .unwrap();
        assert_eq!(e.path, "listeners[0].tls.certs[0]", "{e}");
        assert!(e.message.contains("missing.pem"), "{e}");
        let certs = Certs::load(&cfg(vec![a.clone(), b]), "listeners[0].tls").unwrap();
        let store = CertStore::new(
            "l",
            certs,
            prometheus::IntCounterVec::new(
                prometheus::Opts::new("t", "t"),
                &["listener", "result"],
            )
            .unwrap(),
            prometheus::IntGaugeVec::new(prometheus::Opts::new("e", "e"), &["listener", "name"])
                .unwrap(),
        );
        let again = Certs::load(&cfg(vec![a.clone()]), "listeners[0].tls").unwrap();
        assert!(!store.same_files(&again));
    }
}
