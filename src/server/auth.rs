//! Authentication of upgrade requests: static API keys and JWT bearer tokens, plus the browser
//! `Origin` allow-list.
//!
//! The credential is read from `Authorization: Bearer …`, else the `token` query parameter,
//! else a `bearer.…` entry of `Sec-WebSocket-Protocol` (browsers can set neither headers nor,
//! comfortably, URLs they do not log). Keys are kept only as SHA-256 digests and compared in
//! constant time. Neither keys nor tokens are ever logged or put in metrics: a failure is
//! reported by a closed-set reason only.

use std::collections::HashSet;
use std::path::Path;

use anyhow::Context as _;
use http::{HeaderMap, HeaderValue, header};
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::admission::Quota;
use crate::config::{AuthConfig, AuthMode};

/// The subprotocol echoed to browsers that offer it next to their `bearer.…` entry.
pub const SUBPROTOCOL: &str = "voxflow";
/// Prefix of the `Sec-WebSocket-Protocol` entry carrying a credential.
const PROTOCOL_PREFIX: &str = "bearer.";

/// Why an upgrade was not authorized: the `reason` label of `voxflow_sessions_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credential where one is required.
    Missing,
    /// Unknown key, malformed token, bad signature, unknown signing key or algorithm.
    Invalid,
    /// `exp` has passed.
    Expired,
    /// `aud`, `iss` or `nbf` (or a required claim) does not hold.
    Claims,
    /// A browser `Origin` outside `auth.allowed_origins`.
    Origin,
}

impl AuthFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "auth_missing",
            AuthFailure::Invalid => "auth_invalid",
            AuthFailure::Expired => "auth_expired",
            AuthFailure::Claims => "auth_claims",
            AuthFailure::Origin => "origin",
        }
    }

    /// What the client is told (no detail that would help guess keys).
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => "credentials required\n",
            AuthFailure::Invalid => "invalid credentials\n",
            AuthFailure::Expired => "token expired\n",
            AuthFailure::Claims => "token not valid for this service or not yet valid\n",
            AuthFailure::Origin => "origin not allowed\n",
        }
    }
}

/// An authorized request.
#[derive(Debug, Default)]
pub struct Grant {
    /// How the client proved itself, for logs: `anonymous`, `api_key`, `jwt`.
    pub method: &'static str,
    /// The key's configured id (never the key) for logs.
    pub key_id: Option<String>,
    /// The credential's own session limit.
    pub quota: Option<Quota>,
    /// The subprotocol to echo in the 101 response.
    pub subprotocol: Option<HeaderValue>,
}

struct ApiKey {
    id: String,
    digest: [u8; 32],
    max_sessions: usize,
}

struct JwtKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
}

pub struct Auth {
    modes: Vec<AuthMode>,
    origins: HashSet<String>,
    api_keys: Vec<ApiKey>,
    jwt_keys: Vec<JwtKey>,
    audiences: Vec<String>,
    issuers: Vec<String>,
    leeway_secs: u64,
    max_sessions_per_subject: usize,
}

impl Auth {
    /// Read the key files `config` names.
    ///
    /// # Errors
    /// A file that cannot be read or parsed, or a JWKS without a usable key.
    pub fn load(config: &AuthConfig) -> anyhow::Result<Auth> {
        let api_keys = config
            .api_keys
            .iter()
            .map(|key| {
                let mut digest = [0u8; 32];
                for (i, byte) in digest.iter_mut().enumerate() {
                    *byte = u8::from_str_radix(&key.sha256[2 * i..2 * i + 2], 16)
                        .context("auth.api_keys sha256 is validated as hex")?;
                }
                Ok(ApiKey {
                    id: key.id.clone(),
                    digest,
                    max_sessions: key.max_sessions,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let jwt = &config.jwt;
        let mut jwt_keys = Vec::new();
        if config.mode.contains(&AuthMode::Jwt) {
            if !jwt.hs256_secret_file.is_empty() {
                jwt_keys.push(load_hs256(Path::new(&jwt.hs256_secret_file))?);
            }
            if !jwt.jwks_file.is_empty() {
                jwt_keys.extend(load_jwks(Path::new(&jwt.jwks_file))?);
            }
        }
        Ok(Auth {
            modes: config.mode.clone(),
            origins: config.allowed_origins.iter().cloned().collect(),
            api_keys,
            jwt_keys,
            audiences: jwt.audiences.clone(),
            issuers: jwt.issuers.clone(),
            leeway_secs: jwt.leeway_secs,
            max_sessions_per_subject: jwt.max_sessions_per_subject,
        })
    }

    /// Decide on an upgrade request from its headers and query string.
    ///
    /// # Errors
    /// Why it is refused.
    pub fn check(&self, headers: &HeaderMap, query: &str) -> Result<Grant, AuthFailure> {
        if !self.origins.is_empty()
            && let Some(origin) = headers.get(header::ORIGIN)
            && !origin.to_str().is_ok_and(|o| self.origins.contains(o))
        {
            return Err(AuthFailure::Origin);
        }
        let (credential, subprotocol) = credential(headers, query);
        let checks_keys = self.modes.contains(&AuthMode::ApiKey);
        let checks_jwt = self.modes.contains(&AuthMode::Jwt);
        let mut grant = match credential {
            Some(credential) if checks_keys || checks_jwt => {
                let looks_like_jwt = credential.split('.').count() == 3;
                if checks_jwt && looks_like_jwt {
                    self.check_jwt(&credential)?
                } else if checks_keys {
                    self.check_key(&credential)?
                } else {
                    return Err(AuthFailure::Invalid);
                }
            }
            _ if self.modes.contains(&AuthMode::None) => Grant {
                method: "anonymous",
                ..Grant::default()
            },
            _ => return Err(AuthFailure::Missing),
        };
        grant.subprotocol = subprotocol;
        Ok(grant)
    }

    fn check_key(&self, presented: &str) -> Result<Grant, AuthFailure> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Compare against every key, without stopping early.
        let mut found = None;
        for key in &self.api_keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        let key = found.ok_or(AuthFailure::Invalid)?;
        Ok(Grant {
            method: "api_key",
            key_id: Some(key.id.clone()),
            quota: Some(Quota {
                principal: format!("key:{}", key.id),
                max_sessions: key.max_sessions,
            }),
            subprotocol: None,
        })
    }

    fn check_jwt(&self, token: &str) -> Result<Grant, AuthFailure> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Invalid)?;
        let mut failure = AuthFailure::Invalid;
        let candidates = self.jwt_keys.iter().filter(|key| {
            key.algorithm == header.alg
                && match (&header.kid, &key.kid) {
                    (Some(wanted), Some(kid)) => wanted == kid,
                    _ => true,
                }
        });
        for key in candidates {
            let mut validation = Validation::new(key.algorithm);
            validation.set_audience(&self.audiences);
            validation.set_issuer(&self.issuers);
            validation.set_required_spec_claims(&["exp", "aud", "iss"]);
            validation.validate_nbf = true;
            validation.leeway = self.leeway_secs;
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    let quota = data.claims.sub.map(|sub| Quota {
                        principal: format!("sub:{sub}"),
                        max_sessions: self.max_sessions_per_subject,
                    });
                    return Ok(Grant {
                        method: "jwt",
                        key_id: key.kid.clone(),
                        quota,
                        subprotocol: None,
                    });
                }
                // The signature held: the claims decide, whatever other keys would say.
                Err(error) => match error.kind() {
                    JwtErrorKind::ExpiredSignature => return Err(AuthFailure::Expired),
                    JwtErrorKind::InvalidAudience
                    | JwtErrorKind::InvalidIssuer
                    | JwtErrorKind::ImmatureSignature
                    | JwtErrorKind::MissingRequiredClaim(_) => return Err(AuthFailure::Claims),
                    _ => failure = AuthFailure::Invalid,
                },
            }
        }
        Err(failure)
    }
}

/// The credential, from the first place that has one, and the subprotocol to echo.
fn credential(headers: &HeaderMap, query: &str) -> (Option<String>, Option<HeaderValue>) {
    let mut offered_ours = false;
    let mut from_protocol = None;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        for entry in value.to_str().unwrap_or("").split(',').map(str::trim) {
            if entry == SUBPROTOCOL {
                offered_ours = true;
            } else if let Some(token) = entry.strip_prefix(PROTOCOL_PREFIX) {
                from_protocol.get_or_insert_with(|| token.to_string());
            }
        }
    }
    let subprotocol = offered_ours.then(|| HeaderValue::from_static(SUBPROTOCOL));
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        });
    let from_query = || {
        form_urlencoded::parse(query.as_bytes())
            .find(|(key, _)| key == "token")
            .map(|(_, value)| value.into_owned())
    };
    let credential = from_header
        .or_else(from_query)
        .or(from_protocol)
        .filter(|c| !c.is_empty());
    (credential, subprotocol)
}

fn load_hs256(path: &Path) -> anyhow::Result<JwtKey> {
    let secret = std::fs::read(path)
        .with_context(|| format!("cannot read auth.jwt.hs256_secret_file {}", path.display()))?;
    let secret = secret.trim_ascii_end();
    anyhow::ensure!(
        secret.len() >= 32,
        "auth.jwt.hs256_secret_file {} holds fewer than 32 bytes",
        path.display()
    );
    Ok(JwtKey {
        kid: None,
        algorithm: Algorithm::HS256,
        key: DecodingKey::from_secret(secret),
    })
}

fn load_jwks(path: &Path) -> anyhow::Result<Vec<JwtKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read auth.jwt.jwks_file {}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .with_context(|| format!("auth.jwt.jwks_file {} is not a JWKS", path.display()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let algorithm = match (&jwk.common.key_algorithm, &jwk.algorithm) {
            (Some(KeyAlgorithm::RS256), AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (Some(KeyAlgorithm::ES256), AlgorithmParameters::EllipticCurve(ec))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
            (None, AlgorithmParameters::EllipticCurve(ec)) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            _ => {
                tracing::warn!(
                    kid = jwk.common.key_id.as_deref().unwrap_or(""),
                    "Skipping a JWKS key that is neither RS256 nor ES256 (P-256)."
                );
                continue;
            }
        };
        let key = DecodingKey::from_jwk(jwk)
            .with_context(|| format!("auth.jwt.jwks_file {}: unusable key", path.display()))?;
        keys.push(JwtKey {
            kid: jwk.common.key_id.clone(),
            algorithm,
            key,
        });
    }
    anyhow::ensure!(
        !keys.is_empty(),
        "auth.jwt.jwks_file {} has no RS256 or ES256 key",
        path.display()
    );
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ApiKeyConfig;

    fn auth(modes: &[AuthMode]) -> Auth {
        let config = AuthConfig {
            mode: modes.to_vec(),
            allowed_origins: vec!["https://app.example".into()],
            api_keys: vec![ApiKeyConfig {
                id: "team".into(),
                sha256: hex(&Sha256::digest(b"secret-key")),
                max_sessions: 2,
            }],
            ..AuthConfig::default()
        };
        Auth::load(&config).unwrap()
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn a_key_is_found_in_each_place() {
        let auth = auth(&[AuthMode::ApiKey]);
        let by_header = auth
            .check(&headers(&[("authorization", "Bearer secret-key")]), "")
            .unwrap();
        assert_eq!(by_header.key_id.as_deref(), Some("team"));
        assert!(auth.check(&headers(&[]), "token=secret-key").is_ok());
        let by_protocol = auth
            .check(
                &headers(&[("sec-websocket-protocol", "voxflow, bearer.secret-key")]),
                "",
            )
            .unwrap();
        assert_eq!(by_protocol.subprotocol.unwrap(), "voxflow");
    }

    #[test]
    fn failures_are_told_apart() {
        let auth = auth(&[AuthMode::ApiKey]);
        let check = |h: &[(&'static str, &str)], q: &str| auth.check(&headers(h), q).err();
        assert_eq!(check(&[], ""), Some(AuthFailure::Missing));
        assert_eq!(check(&[], "token=nope"), Some(AuthFailure::Invalid));
        assert_eq!(
            check(&[("authorization", "Basic c2VjcmV0LWtleQ==")], ""),
            Some(AuthFailure::Missing)
        );
        assert_eq!(
            check(
                &[
                    ("origin", "https://evil.example"),
                    ("authorization", "Bearer secret-key")
                ],
                ""
            ),
            Some(AuthFailure::Origin)
        );
        assert!(check(&[("origin", "https://app.example")], "token=secret-key").is_none());
    }

    #[test]
    fn none_mode_admits_the_anonymous_but_still_checks_keys() {
        let auth = auth(&[AuthMode::None, AuthMode::ApiKey]);
        assert_eq!(auth.check(&headers(&[]), "").unwrap().method, "anonymous");
        assert_eq!(
            auth.check(&headers(&[]), "token=wrong").err(),
            Some(AuthFailure::Invalid)
        );
    }
}
