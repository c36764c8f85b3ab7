//! TLS test support: certificates made with rcgen, written as PEM files the
//! gateway loads, and a real rustls client that reports which certificate
//! the server presented and which ALPN protocol it chose.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// A certificate/key pair on disk and its DER, to compare with what a
/// server presents.
pub struct TestCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: Vec<u8>,
}

/// Writes a fresh self-signed certificate for `names` to `dir/<file>.pem`
/// and `dir/<file>.key` (replacing what is there).
pub fn write_cert(dir: &Path, file: &str, names: &[&str]) -> TestCert {
    std::fs::create_dir_all(dir).unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let ck = rcgen::generate_simple_self_signed(names).expect("rcgen");
    let cert = dir.join(format!("{file}.pem"));
    let key = dir.join(format!("{file}.key"));
    // Write to a temporary name and rename: a poller never sees half a file.
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, ck.signing_key.serialize_pem()).unwrap();
    std::fs::rename(&tmp, &key).unwrap();
    std::fs::write(&tmp, ck.cert.pem()).unwrap();
    std::fs::rename(&tmp, &cert).unwrap();
    TestCert {
        cert,
        key,
        der: ck.cert.der().to_vec(),
    }
}

/// Like [`write_cert`], valid until midnight UTC of the given date.
pub fn write_cert_until(dir: &Path, file: &str, names: &[&str], ymd: (i32, u8, u8)) -> TestCert {
    std::fs::create_dir_all(dir).unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = rcgen::CertificateParams::new(names).expect("rcgen params");
    params.not_after = rcgen::date_time_ymd(ymd.0, ymd.1, ymd.2);
    let key = rcgen::KeyPair::generate().expect("rcgen key");
    let cert = params.self_signed(&key).expect("rcgen cert");
    let cert_path = dir.join(format!("{file}.pem"));
    let key_path = dir.join(format!("{file}.key"));
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, key.serialize_pem()).unwrap();
    std::fs::rename(&tmp, &key_path).unwrap();
    std::fs::write(&tmp, cert.pem()).unwrap();
    std::fs::rename(&tmp, &cert_path).unwrap();
    TestCert {
        cert: cert_path,
        key: key_path,
        der: cert.der().to_vec(),
    }
}

/// A fresh temporary directory for one test's files.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flashgate-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Accepts any server certificate (signatures are still checked): the
/// tests compare the presented certificate with the expected one
/// byte for byte instead, which is stricter than a name check.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How a test client connects.
#[derive(Clone)]
pub struct ClientOpts {
    /// The SNI name; `None` sends no SNI.
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
    /// Only this TLS version, when set (`&rustls::version::TLS12`).
    pub version: Option<&'static rustls::SupportedProtocolVersion>,
}

impl ClientOpts {
    pub fn sni(name: &str) -> ClientOpts {
        ClientOpts {
            sni: Some(name.into()),
            alpn: vec![b"http/1.1".to_vec()],
            version: None,
        }
    }
}

/// Connects and completes a TLS handshake.
pub async fn connect(addr: SocketAddr, opts: &ClientOpts) -> std::io::Result<TlsStream<TcpStream>> {
    connect_over(TcpStream::connect(addr).await?, opts).await
}

/// Completes a TLS handshake on a connected stream (after a PROXY header).
pub async fn connect_over(
    tcp: TcpStream,
    opts: &ClientOpts,
) -> std::io::Result<TlsStream<TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: Vec<&'static rustls::SupportedProtocolVersion> = match opts.version {
        Some(v) => vec![v],
        None => vec![&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    config.alpn_protocols = opts.alpn.clone();
    config.enable_sni = opts.sni.is_some();
    let name = ServerName::try_from(opts.sni.clone().unwrap_or_else(|| "unused.invalid".into()))
        .expect("valid name");
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// The DER of the certificate the server presented.
pub fn served_cert(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .expect("the server presented a certificate")
}

/// The ALPN protocol the server chose.
pub fn alpn(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(|p| p.to_vec())
}

/// An HTTP/1.1 connection over `stream`, its driver spawned.
pub async fn h1(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http1::SendRequest<crate::Body> {
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    send
}

/// An HTTP/2 connection over `stream`, its driver spawned.
pub async fn h2(
    stream: TlsStream<TcpStream>,
) -> hyper::client::conn::http2::SendRequest<crate::Body> {
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// A TLS 1.1 ClientHello (no `supported_versions` extension, legacy
/// version 0x0302, TLS 1.0-era suites), as an old client sends it. rustls
/// cannot produce one, hence raw bytes.
pub fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x14, 0x00, 0x2f]); // suites
    body.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01]; // ClientHello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake record, TLS 1.0 record version
    record.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    record.extend_from_slice(&hs);
    record
}
