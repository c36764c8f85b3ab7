//! `[jwt]`: how client identity is verified (see `pipeline::identity::jwt`).
//! The shape is checked here; an RS256 key file is read and parsed when the
//! verifier is built, so that `flashgate check` and a reload read it once.

use std::path::{Path, PathBuf};

use http::HeaderName;
use serde::Deserialize;

use super::ConfigError;

/// The header the verified subject goes into.
pub const DEFAULT_USER_HEADER: &str = "x-user-id";

/// `[jwt]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// `"HS256"`, `"RS256"` or `"ES256"`: the one algorithm accepted.
    pub algorithm: String,
    /// HS256: the shared secret.
    #[serde(default)]
    pub secret: Option<String>,
    /// RS256 / ES256: path of the issuer's public key (PEM).
    #[serde(default)]
    pub public_key: Option<PathBuf>,
    /// RS256 / ES256: a JWKS file (`{"keys": [...]}`) instead of one key:
    /// a token's `kid` picks its key; read again when the file changes,
    /// so an issuer's key rotation needs no reload.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Required `iss`, if set.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Where the verified subject goes.
    #[serde(default = "default_user_header")]
    pub user_header: String,
}

fn default_user_header() -> String {
    DEFAULT_USER_HEADER.into()
}

/// The algorithm a `[jwt]` section asks for, with its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtKey<'a> {
    /// HS256 and its shared secret.
    Hs256Secret(&'a str),
    /// RS256 and the PEM file of the issuer's public key.
    Rs256PublicKey(&'a Path),
    /// ES256 (P-256) and the PEM file of the issuer's public key.
    Es256PublicKey(&'a Path),
    /// RS256 or ES256 (the algorithm named) with keys from a JWKS file.
    Jwks(&'a str, &'a Path),
}

impl JwtConfig {
    /// The algorithm and its key, checked as far as the text goes; errors
    /// name the `jwt.*` key. One accessor for validation and for the
    /// verifier, so the two cannot disagree on what is valid.
    pub fn key(&self) -> Result<JwtKey<'_>, ConfigError> {
        match self.algorithm.as_str() {
            "HS256" => self
                .secret
                .as_deref()
                .filter(|s| s.len() >= 16)
                .map(JwtKey::Hs256Secret)
                .ok_or_else(|| {
                    ConfigError::at("jwt.secret", "HS256 needs a secret of at least 16 bytes")
                }),
            alg @ ("RS256" | "ES256") => match (&self.public_key, &self.jwks_file) {
                (Some(_), Some(_)) => Err(ConfigError::at(
                    "jwt.jwks_file",
                    "set public_key or jwks_file, not both",
                )),
                (None, Some(jwks)) => Ok(JwtKey::Jwks(alg, jwks)),
                (Some(pem), None) if alg == "RS256" => Ok(JwtKey::Rs256PublicKey(pem)),
                (Some(pem), None) => Ok(JwtKey::Es256PublicKey(pem)),
                (None, None) => Err(ConfigError::at(
                    "jwt.public_key",
                    format!("{alg} needs a public key (public_key or jwks_file)"),
                )),
            },
            other => Err(ConfigError::at(
                "jwt.algorithm",
                format!("{other:?} is not supported (HS256, RS256 or ES256)"),
            )),
        }
    }

    /// `user_header` as a header name.
    pub fn user_header(&self) -> Result<HeaderName, ConfigError> {
        HeaderName::from_bytes(self.user_header.as_bytes())
            .map_err(|_| ConfigError::at("jwt.user_header", "not a valid header name"))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.key()?;
        self.user_header()?;
        Ok(())
    }
}
