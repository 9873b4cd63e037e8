//! Service-account tokens: JWTs signed by the server (ES256, key in
//! `DATA_DIR/tls/sa.key`), issued through `serviceaccounts/<name>/token`
//! (TokenRequest) and accepted as bearer tokens while the service account
//! they name still exists with the same uid.

use base64::Engine;
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, KeyPair},
};
use serde_json::{Value, json};
use std::path::Path;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "the service account signing key {path} is unusable: {detail}; move it away to have a new one generated (existing tokens become invalid)"
    )]
    Key { path: String, detail: String },
    #[error("cannot write {path}: {detail}")]
    Write { path: String, detail: String },
    #[error("signing failed")]
    Sign,
}

/// The token signer and verifier.
#[derive(Debug)]
pub struct Signer {
    key: EcdsaKeyPair,
    key_id: String,
}

/// Claims of a valid service-account token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub audiences: Vec<String>,
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl Signer {
    /// Loads the key in `dir/tls/sa.key`, creating it on first boot.
    pub fn load_or_create(dir: &Path) -> Result<Self, TokenError> {
        let path = dir.join("tls").join("sa.key");
        let rng = SystemRandom::new();
        let pkcs8 = match std::fs::read_to_string(&path) {
            Ok(text) => base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| TokenError::Key {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?,
            Err(_) => {
                let doc =
                    EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                        .map_err(|_| TokenError::Sign)?;
                let text = base64::engine::general_purpose::STANDARD.encode(doc.as_ref());
                crate::pki::write_private(&path, &text).map_err(|e| TokenError::Write {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
                doc.as_ref().to_vec()
            }
        };
        let key =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
                .map_err(|e| TokenError::Key {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
        let key_id = b64(&key.public_key().as_ref()[..12]);
        Ok(Self { key, key_id })
    }

    /// Issues a token for a service account.
    pub fn issue(
        &self,
        claims: &Claims,
        lifetime_s: i64,
    ) -> Result<(String, chrono::DateTime<chrono::Utc>), TokenError> {
        let now = chrono::Utc::now();
        let exp = now + chrono::Duration::seconds(lifetime_s);
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.key_id});
        let body = json!({
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{}:{}", claims.namespace, claims.name),
            "aud": claims.audiences,
            "iat": now.timestamp(),
            "nbf": now.timestamp(),
            "exp": exp.timestamp(),
            "kubernetes.io": {
                "namespace": claims.namespace,
                "serviceaccount": {"name": claims.name, "uid": claims.uid},
            },
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(body.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| TokenError::Sign)?;
        Ok((format!("{signing_input}.{}", b64(sig.as_ref())), exp))
    }

    /// The claims of a token this server signed, if it is valid now.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let mut parts = token.split('.');
        let (h, b, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .ok()?;
        let public = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        );
        public.verify(format!("{h}.{b}").as_bytes(), &sig).ok()?;
        let body: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b)
                .ok()?,
        )
        .ok()?;
        let now = chrono::Utc::now().timestamp();
        if body.get("exp").and_then(Value::as_i64)? < now
            || body.get("iss").and_then(Value::as_str)? != ISSUER
        {
            return None;
        }
        let k = body.get("kubernetes.io")?;
        Some(Claims {
            namespace: k.get("namespace")?.as_str()?.to_owned(),
            name: k.pointer("/serviceaccount/name")?.as_str()?.to_owned(),
            uid: k.pointer("/serviceaccount/uid")?.as_str()?.to_owned(),
            audiences: body
                .get("aud")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }
}

/// The claims of a service-account token the API server accepts as a
/// bearer token: valid now, and naming an account that still exists with
/// the uid it was issued for. (Other services that take these tokens, such
/// as the mesh CA, call this.)
pub async fn verify_current(signer: &Signer, api: &crate::api::Api, token: &str) -> Option<Claims> {
    let claims = signer.verify(token)?;
    let info = api.registry.lookup("", "v1", "serviceaccounts")?;
    let (sa, _) = api
        .read(&info, Some(&claims.namespace), &claims.name)
        .await
        .ok()?;
    (crate::objects::meta_str(&sa, "uid") == Some(claims.uid.as_str())).then_some(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_tampered_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::load_or_create(dir.path()).unwrap();
        let claims = Claims {
            namespace: "ns".into(),
            name: "bot".into(),
            uid: "u-1".into(),
            audiences: vec!["api".into()],
        };
        let (token, _) = signer.issue(&claims, 600).unwrap();
        assert_eq!(signer.verify(&token), Some(claims.clone()));
        let mut bad = token.clone();
        bad.replace_range(bad.len() - 4.., "AAAA");
        assert_eq!(signer.verify(&bad), None);
        let (expired, _) = signer.issue(&claims, -10).unwrap();
        assert_eq!(signer.verify(&expired), None);
        // The key survives a restart.
        let again = Signer::load_or_create(dir.path()).unwrap();
        assert_eq!(again.verify(&token), Some(claims));
    }
}
