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
    /// `"HS256"` or `"RS256"`.
    pub algorithm: String,
    /// HS256: the shared secret.
    #[serde(default)]
    pub secret: Option<String>,
    /// RS256: path of the issuer's public key (PEM).
    #[serde(default)]
    pub public_key: Option<PathBuf>,
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
            "RS256" => self
                .public_key
                .as_deref()
                .map(JwtKey::Rs256PublicKey)
                .ok_or_else(|| ConfigError::at("jwt.public_key", "RS256 needs a public key")),
            other => Err(ConfigError::at(
                "jwt.algorithm",
                format!("{other:?} is not supported (HS256 or RS256)"),
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
