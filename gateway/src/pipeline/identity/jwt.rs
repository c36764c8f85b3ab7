//! Client identity from a JWT (`[jwt]`): the gateway verifies
//! `authorization: Bearer <token>` (HS256 with a shared secret, RS256 or
//! ES256 with the issuer's public key, or keys from a JWKS file picked by
//! the token's `kid`) and forwards the verified subject to the upstream
//! as `x-user-id`. `exp` is required and `nbf` honoured (5 s leeway).
//!
//! The user header is trusted by the order core, so the gateway owns it:
//! whatever a client sends under that name is removed on every request,
//! verified or not. Only a subject this gateway verified reaches the core.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{header, HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::pipeline::runtime::file_watch;

use crate::config::{ConfigError, JwtConfig, JwtKey, DEFAULT_USER_HEADER};

/// Why a request has no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the bearer token is invalid: {0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
}

/// A verifier built from a validated `[jwt]`.
pub struct JwtVerifier {
    keys: Keys,
    validation: Validation,
    pub user_header: HeaderName,
}

enum Keys {
    One(DecodingKey),
    Jwks(Arc<Jwks>),
}

/// A JWKS file's keys by `kid`, swapped whole when the file changes.
struct Jwks {
    alg: Algorithm,
    keys: ArcSwap<HashMap<String, DecodingKey>>,
}

/// The keys of a JWKS document with a `kid` and of the configured
/// algorithm's family (RSA for RS256, EC for ES256); others are skipped.
fn parse_jwks(text: &str, alg: Algorithm) -> Result<HashMap<String, DecodingKey>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else {
            continue;
        };
        let family = matches!(
            (&jwk.algorithm, alg),
            (
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_),
                Algorithm::RS256
            ) | (
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_),
                Algorithm::ES256
            )
        );
        if !family {
            continue;
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
        keys.insert(kid.clone(), key);
    }
    Ok(keys)
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        ConfigError::at(
            "jwt.public_key",
            format!("cannot read {}: {e}", path.display()),
        )
    })
}

impl JwtVerifier {
    /// Builds the verifier, reading an RS256 key file; errors name the
    /// `jwt.*` key. Built once per config, by the runtime.
    pub fn new(c: &JwtConfig) -> Result<JwtVerifier, ConfigError> {
        Self::build(c, false)
    }

    /// [`new`](Self::new), and with `watch` a JWKS file is read again
    /// when it changes (needs a tokio runtime).
    pub fn build(c: &JwtConfig, watch: bool) -> Result<JwtVerifier, ConfigError> {
        let (alg, keys) = match c.key()? {
            JwtKey::Hs256Secret(secret) => (
                Algorithm::HS256,
                Keys::One(DecodingKey::from_secret(secret.as_bytes())),
            ),
            JwtKey::Rs256PublicKey(path) => {
                let key = DecodingKey::from_rsa_pem(&read_pem(path)?).map_err(|e| {
                    ConfigError::at(
                        "jwt.public_key",
                        format!("not an RSA public key (PEM): {e}"),
                    )
                })?;
                (Algorithm::RS256, Keys::One(key))
            }
            JwtKey::Es256PublicKey(path) => {
                let key = DecodingKey::from_ec_pem(&read_pem(path)?).map_err(|e| {
                    ConfigError::at("jwt.public_key", format!("not an EC public key (PEM): {e}"))
                })?;
                (Algorithm::ES256, Keys::One(key))
            }
            JwtKey::Jwks(name, path) => {
                let alg = if name == "ES256" {
                    Algorithm::ES256
                } else {
                    Algorithm::RS256
                };
                let at = |m: String| ConfigError::at("jwt.jwks_file", m);
                let text = std::fs::read_to_string(path)
                    .map_err(|e| at(format!("cannot read {}: {e}", path.display())))?;
                let keys =
                    parse_jwks(&text, alg).map_err(|m| at(format!("{}: {m}", path.display())))?;
                let jwks = Arc::new(Jwks {
                    alg,
                    keys: ArcSwap::from_pointee(keys),
                });
                if watch {
                    file_watch::watch(
                        &jwks,
                        path.to_path_buf(),
                        "jwt jwks_file",
                        |j: &Jwks, text| {
                            let new = parse_jwks(text, j.alg)?;
                            let n = new.len();
                            j.keys.store(Arc::new(new));
                            Ok(n)
                        },
                    );
                }
                (alg, Keys::Jwks(jwks))
            }
        };
        let user_header = c.user_header()?;
        // One algorithm only: a token cannot pick a weaker one (the
        // classic "alg: none" / HS-with-public-key confusion).
        let mut validation = Validation::new(alg);
        validation.leeway = 5;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &c.issuer {
            validation.set_issuer(&[iss]);
        }
        match &c.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Ok(JwtVerifier {
            keys,
            validation,
            user_header,
        })
    }

    /// Verifies the request's bearer token, if any, and sets the user
    /// header to its subject. The client's own user header is always gone
    /// afterwards. `Ok(None)`: no token was sent.
    pub fn identify(&self, headers: &mut HeaderMap) -> Result<Option<String>, IdentityError> {
        headers.remove(&self.user_header);
        let Some(auth) = headers.get(header::AUTHORIZATION) else {
            return Ok(None);
        };
        let token = auth
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or_else(|| IdentityError::Invalid("not a bearer token".into()))?;
        let invalid = |e: jsonwebtoken::errors::Error| IdentityError::Invalid(e.to_string());
        let data = match &self.keys {
            Keys::One(key) => jsonwebtoken::decode::<Claims>(token, key, &self.validation),
            Keys::Jwks(jwks) => {
                let kid = jsonwebtoken::decode_header(token)
                    .map_err(invalid)?
                    .kid
                    .ok_or_else(|| IdentityError::Invalid("the token names no kid".into()))?;
                let keys = jwks.keys.load();
                let key = keys
                    .get(&kid)
                    .ok_or_else(|| IdentityError::Invalid(format!("unknown kid {kid:?}")))?;
                jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            }
        }
        .map_err(invalid)?;
        let sub = data.claims.sub;
        let value = HeaderValue::from_str(&sub)
            .ok()
            .filter(|_| !sub.is_empty() && sub.len() <= 128)
            .ok_or_else(|| IdentityError::Invalid("subject is not a usable user id".into()))?;
        headers.insert(self.user_header.clone(), value);
        Ok(Some(sub))
    }
}

/// Removes a client-sent user header when no `[jwt]` is configured: the
/// header is the gateway's to set, never the client's.
pub fn strip_user_header(headers: &mut HeaderMap) {
    headers.remove(DEFAULT_USER_HEADER);
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "0123456789abcdef-test";

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(&JwtConfig {
            algorithm: "HS256".into(),
            secret: Some(SECRET.into()),
            public_key: None,
            jwks_file: None,
            issuer: Some("shop".into()),
            audience: None,
            user_header: DEFAULT_USER_HEADER.into(),
        })
        .unwrap()
    }

    fn token(sub: &str, iss: &str, exp_in: i64, secret: &str) -> String {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + exp_in;
        encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": sub, "iss": iss, "exp": exp}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn headers(auth: Option<String>, user: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        if let Some(u) = user {
            h.insert(DEFAULT_USER_HEADER, u.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_valid_token_sets_the_subject_and_replaces_a_forged_header() {
        let v = verifier();
        let mut h = headers(
            Some(format!("Bearer {}", token("alice", "shop", 60, SECRET))),
            Some("mallory"),
        );
        assert_eq!(v.identify(&mut h).unwrap().as_deref(), Some("alice"));
        assert_eq!(h.get_all(DEFAULT_USER_HEADER).iter().count(), 1);
        assert_eq!(h[DEFAULT_USER_HEADER], "alice");
    }

    #[test]
    fn bad_tokens_are_refused_and_forged_headers_dropped() {
        let v = verifier();
        for bad in [
            token("a", "shop", -3600, SECRET),
            token("a", "other", 60, SECRET),
            token("a", "shop", 60, "another-secret-of-16"),
            "not.a.jwt".to_string(),
        ] {
            let mut h = headers(Some(format!("Bearer {bad}")), Some("mallory"));
            assert!(v.identify(&mut h).is_err(), "{bad}");
            assert!(h.get(DEFAULT_USER_HEADER).is_none());
        }
        let mut h = headers(None, Some("mallory"));
        assert_eq!(v.identify(&mut h).unwrap(), None);
        assert!(h.get(DEFAULT_USER_HEADER).is_none());
    }

    #[test]
    fn config_errors_name_the_key() {
        let mut c = JwtConfig {
            algorithm: "HS256".into(),
            secret: Some("short".into()),
            public_key: None,
            jwks_file: None,
            issuer: None,
            audience: None,
            user_header: DEFAULT_USER_HEADER.into(),
        };
        assert_eq!(JwtVerifier::new(&c).err().unwrap().path, "jwt.secret");
        c.algorithm = "none".into();
        assert_eq!(JwtVerifier::new(&c).err().unwrap().path, "jwt.algorithm");
    }
}
