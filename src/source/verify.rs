//! `[source.verify]`: who may deploy. A commit deploys only when it carries
//! a good signature by a key the host config trusts: an SSH key of the
//! `allowed_signers` file (the `ssh-keygen -Y` format, namespace `git`,
//! checked with the `ssh-key` crate) or an OpenPGP key of `openpgp_keys`
//! (checked with the `pgp` crate). No `gpg` or `ssh-keygen` runs.
//!
//! The trust files are read at every verification, so adding or removing
//! a key takes effect at the next commit. A commit that fails is a
//! `Refusal`, which the engine records as a `refused` rollout.

use std::path::{Path, PathBuf};

use crate::config::VerifyConfig;

/// A trust file that cannot be used: nothing verifies until it is fixed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {key} \"{}\": {source}", path.display())]
    Unreadable {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("openpgp_keys \"{}\": {message}", path.display())]
    OpenPgp { path: PathBuf, message: String },
}

/// Why a commit does not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Unsigned,
    /// Signed, by a key no trust file holds.
    UnknownKey(String),
    /// The signature does not match the commit, or is not a git signature.
    BadSignature(String),
    /// The key had expired or was revoked when it signed, or is only valid
    /// outside the commit's time (`valid-after` / `valid-before`).
    KeyNotValid(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Unsigned => f.write_str("unsigned"),
            Refusal::UnknownKey(key) => write!(f, "signed by an unknown key, {key}"),
            Refusal::BadSignature(why) => write!(f, "bad signature: {why}"),
            Refusal::KeyNotValid(why) => write!(f, "{why}"),
        }
    }
}

/// Who signed a commit that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signer(pub String);

/// One line of an allowed signers file.
#[derive(Debug, Clone)]
struct AllowedSigner {
    principals: String,
    key: ssh_key::public::KeyData,
    namespaces: Option<Vec<String>>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
    line: usize,
}

/// The keys of `[source.verify]`, as read now.
pub struct Trust {
    signers: Vec<AllowedSigner>,
    signers_file: Option<PathBuf>,
    openpgp: Vec<pgp::composed::SignedPublicKey>,
}

impl Trust {
    pub fn load(cfg: &VerifyConfig) -> Result<Trust, TrustError> {
        let signers = match &cfg.allowed_signers {
            Some(path) => parse_allowed_signers(path, &read(path, "allowed_signers")?)?,
            None => Vec::new(),
        };
        let openpgp = match &cfg.openpgp_keys {
            Some(path) => parse_openpgp(path, &read(path, "openpgp_keys")?)?,
            None => Vec::new(),
        };
        Ok(Trust {
            signers,
            signers_file: cfg.allowed_signers.clone(),
            openpgp,
        })
    }

    /// Whether `signature` (the commit's `gpgsig` header) is a good one of
    /// `data` (the commit without it) by a trusted key, valid at `time`
    /// (the committer's, in seconds: what git passes to `ssh-keygen`).
    pub fn verify(
        &self,
        signature: Option<&str>,
        data: &[u8],
        time: i64,
    ) -> Result<Signer, Refusal> {
        let Some(signature) = signature else {
            return Err(Refusal::Unsigned);
        };
        let armor = signature.trim_start();
        if armor.starts_with("-----BEGIN SSH SIGNATURE-----") {
            self.verify_ssh(armor, data, time)
        } else if armor.starts_with("-----BEGIN PGP SIGNATURE-----") {
            self.verify_openpgp(armor, data, time)
        } else {
            Err(Refusal::BadSignature(
                "neither an SSH nor an OpenPGP signature (X.509 signatures are not supported)"
                    .into(),
            ))
        }
    }

    fn verify_ssh(&self, armor: &str, data: &[u8], time: i64) -> Result<Signer, Refusal> {
        let sig = ssh_key::SshSig::from_pem(armor)
            .map_err(|e| Refusal::BadSignature(format!("unreadable SSH signature ({e})")))?;
        let key = ssh_key::PublicKey::from(sig.public_key().clone());
        let name = ssh_key_name(&key);
        let Some(signer) = self.signers.iter().find(|s| &s.key == sig.public_key()) else {
            return Err(Refusal::UnknownKey(name));
        };
        let at = || {
            self.signers_file.as_deref().map_or_else(String::new, |p| {
                format!(" ({}:{})", p.display(), signer.line)
            })
        };
        if sig.namespace() != "git" {
            return Err(Refusal::BadSignature(format!(
                "made for namespace {:?}, not \"git\"",
                sig.namespace()
            )));
        }
        key.verify("git", data, &sig)
            .map_err(|_| Refusal::BadSignature(format!("{name} did not sign this commit")))?;
        if let Some(namespaces) = &signer.namespaces
            && !namespaces.iter().any(|n| n == "git")
        {
            return Err(Refusal::KeyNotValid(format!(
                "key {name} of {} may not sign git commits (namespaces=\"{}\"){}",
                signer.principals,
                namespaces.join(","),
                at()
            )));
        }
        if let Some(after) = signer.valid_after
            && time < after
        {
            return Err(Refusal::KeyNotValid(format!(
                "key {name} of {} is valid only after {}{}; the commit is of {}",
                signer.principals,
                date(after),
                at(),
                date(time)
            )));
        }
        if let Some(before) = signer.valid_before
            && time >= before
        {
            return Err(Refusal::KeyNotValid(format!(
                "key {name} of {} expired on {}{}; the commit is of {}",
                signer.principals,
                date(before),
                at(),
                date(time)
            )));
        }
        Ok(Signer(format!("{} ({name})", signer.principals)))
    }

    fn verify_openpgp(&self, armor: &str, data: &[u8], time: i64) -> Result<Signer, Refusal> {
        use pgp::composed::Deserializable;
        use pgp::types::KeyDetails;
        let (sig, _) = pgp::composed::DetachedSignature::from_string(armor)
            .map_err(|e| Refusal::BadSignature(format!("unreadable OpenPGP signature ({e})")))?;
        let issuers: Vec<String> = sig
            .signature
            .issuer_key_id()
            .iter()
            .map(|id| hex_upper(id.as_ref()))
            .chain(
                sig.signature
                    .issuer_fingerprint()
                    .iter()
                    .map(|fp| format!("{fp:X}")),
            )
            .collect();
        let named = |fingerprint: &str| {
            issuers
                .iter()
                .any(|i| fingerprint.to_uppercase().ends_with(&i.to_uppercase()))
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let signed_at = sig
            .signature
            .created()
            .map(|t| i64::from(t.as_secs()))
            .unwrap_or(time);
        for key in &self.openpgp {
            let primary = &key.primary_key;
            let user = key
                .details
                .users
                .first()
                .map(|u| String::from_utf8_lossy(u.id.id()).into_owned())
                .unwrap_or_default();
            let label = |fp: String| format!("OpenPGP key {fp} ({user})");
            // The primary key, then each subkey, with its own expiry.
            let mut candidates: Vec<(Candidate<'_>, String, Option<i64>)> = Vec::new();
            let primary_expiry = expiry(
                primary.created_at(),
                key.details
                    .users
                    .iter()
                    .flat_map(|u| u.signatures.iter())
                    .chain(key.details.direct_signatures.iter()),
            );
            candidates.push((
                Candidate::Primary(primary),
                format!("{:X}", primary.fingerprint()),
                primary_expiry,
            ));
            for sub in &key.public_subkeys {
                candidates.push((
                    Candidate::Sub(&sub.key),
                    format!("{:X}", sub.key.fingerprint()),
                    expiry(sub.key.created_at(), sub.signatures.iter()).or(primary_expiry),
                ));
            }
            for (candidate, fingerprint, expiry) in candidates {
                if !named(&fingerprint) {
                    continue;
                }
                let verified = match candidate {
                    Candidate::Primary(k) => sig.verify(k, data),
                    Candidate::Sub(k) => sig.verify(k, data),
                };
                verified.map_err(|_| {
                    Refusal::BadSignature(format!(
                        "{} did not sign this commit",
                        label(fingerprint.clone())
                    ))
                })?;
                if !key.details.revocation_signatures.is_empty() {
                    return Err(Refusal::KeyNotValid(format!(
                        "{} is revoked",
                        label(fingerprint)
                    )));
                }
                // As git (gpg's EXPKEYSIG): a key that has expired signs
                // nothing more that deploys, whenever it signed.
                if let Some(expiry) = expiry
                    && now >= expiry
                {
                    return Err(Refusal::KeyNotValid(format!(
                        "{} expired on {}; it signed on {}",
                        label(fingerprint),
                        date(expiry),
                        date(signed_at)
                    )));
                }
                return Ok(Signer(label(fingerprint)));
            }
        }
        Err(Refusal::UnknownKey(match issuers.first() {
            Some(id) => format!("OpenPGP key {id}"),
            None => "an OpenPGP key that does not say which".into(),
        }))
    }
}

/// When a key made at `created` expires, by the latest expiration its
/// binding `signatures` give (none, or zero: never).
fn expiry<'s>(
    created: pgp::types::Timestamp,
    signatures: impl Iterator<Item = &'s pgp::packet::Signature>,
) -> Option<i64> {
    signatures
        .filter_map(|s| s.key_expiration_time())
        .map(|d| d.as_secs())
        .filter(|&secs| secs > 0)
        .max()
        .map(|secs| i64::from(created.as_secs()) + i64::from(secs))
}

/// A key of an OpenPGP certificate that may have made a signature.
enum Candidate<'k> {
    Primary(&'k pgp::packet::PublicKey),
    Sub(&'k pgp::packet::PublicSubkey),
}

fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// Why a branch head could not be judged (not a refusal: nothing is
/// recorded, the agent tries again).
#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Git(#[from] crate::source::git::GitError),
}

/// Judge what deploying `head` over `deployed` would bring: the head alone
/// (`commits = "tip"`, or a first deploy), or every commit `deployed` does
/// not have (`"all"`; after a rewrite, each commit of the new history up
/// to where it meets the old). `Ok(Err(reason))` is a refusal, naming the
/// commit; `Ok(Ok(signers))` who signed each commit, head first.
pub fn judge(
    source: &crate::source::git::Source,
    cfg: &VerifyConfig,
    head: &str,
    deployed: Option<&str>,
) -> Result<Result<Vec<(String, Signer)>, String>, JudgeError> {
    let trust = Trust::load(cfg)?;
    let commits = match cfg.commits {
        crate::config::VerifyCommits::Tip => vec![head.to_string()],
        crate::config::VerifyCommits::All => source.new_commits(head, deployed)?,
    };
    let mut signers = Vec::new();
    for commit in &commits {
        let (signature, data, time) = source.signature_of(commit)?;
        match trust.verify(signature.as_deref(), &data, time) {
            Ok(signer) => signers.push((commit.clone(), signer)),
            Err(refusal) => {
                let mut reason = format!("refused commit {}: {refusal}", short(commit));
                if commit != head {
                    reason.push_str(&format!(
                        " (one of the {} new commits up to the branch head {}; commits = \"all\" judges each)",
                        commits.len(),
                        short(head)
                    ));
                }
                return Ok(Err(reason));
            }
        }
    }
    Ok(Ok(signers))
}

fn short(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}

fn read(path: &Path, key: &'static str) -> Result<String, TrustError> {
    std::fs::read_to_string(path).map_err(|source| TrustError::Unreadable {
        key,
        path: path.to_path_buf(),
        source,
    })
}

/// `ED25519 SHA256:…`, as ssh names a key.
fn ssh_key_name(key: &ssh_key::PublicKey) -> String {
    let kind = match key.algorithm() {
        ssh_key::Algorithm::Ed25519 => "ED25519".to_owned(),
        ssh_key::Algorithm::Rsa { .. } => "RSA".to_owned(),
        ssh_key::Algorithm::Ecdsa { .. } => "ECDSA".to_owned(),
        other => other.to_string().to_uppercase(),
    };
    format!("{kind} {}", key.fingerprint(ssh_key::HashAlg::Sha256))
}

/// Whitespace-separated words, a double-quoted run kept whole.
fn words(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => {
                quoted = !quoted;
                start.get_or_insert(i);
            }
            c if c.is_whitespace() && !quoted => {
                if let Some(s) = start.take() {
                    out.push(&line[s..i]);
                }
            }
            _ => {
                start.get_or_insert(i);
            }
        }
    }
    if let Some(s) = start {
        out.push(&line[s..]);
    }
    out
}

fn is_key_type(word: &str) -> bool {
    word.starts_with("ssh-") || word.starts_with("ecdsa-sha2-") || word.starts_with("sk-")
}

/// The `ssh-keygen -Y` allowed signers format (ssh-keygen(1), "ALLOWED
/// SIGNERS"): `principals [options] keytype base64 [comment]`. What moorline
/// cannot honour (`cert-authority`) is refused, never skipped.
fn parse_allowed_signers(path: &Path, text: &str) -> Result<Vec<AllowedSigner>, TrustError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |message: String| TrustError::Line {
            path: path.to_path_buf(),
            line,
            message,
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let w = words(trimmed);
        let (principals, options, kind, base64) = match w.as_slice() {
            [p, k, b, ..] if is_key_type(k) => (*p, None, *k, *b),
            [p, o, k, b, ..] if is_key_type(k) => (*p, Some(*o), *k, *b),
            _ => {
                return Err(err("expected \"principals [options] keytype key\"".into()));
            }
        };
        let key = ssh_key::PublicKey::from_openssh(&format!("{kind} {base64}"))
            .map_err(|e| err(format!("unreadable {kind} key ({e})")))?;
        let mut signer = AllowedSigner {
            principals: principals.trim_matches('"').to_owned(),
            key: key.key_data().clone(),
            namespaces: None,
            valid_after: None,
            valid_before: None,
            line,
        };
        for option in options.map(split_options).unwrap_or_default() {
            let (name, value) = match option.split_once('=') {
                Some((n, v)) => (n.to_ascii_lowercase(), Some(v.trim_matches('"'))),
                None => (option.to_ascii_lowercase(), None),
            };
            match (name.as_str(), value) {
                ("namespaces", Some(v)) => {
                    signer.namespaces = Some(v.split(',').map(str::to_owned).collect());
                }
                ("valid-after", Some(v)) => {
                    signer.valid_after = Some(timestamp(v).ok_or_else(|| {
                        err(format!("valid-after {v:?} is not YYYYMMDD[HHMM[SS]][Z]"))
                    })?);
                }
                ("valid-before", Some(v)) => {
                    signer.valid_before = Some(timestamp(v).ok_or_else(|| {
                        err(format!("valid-before {v:?} is not YYYYMMDD[HHMM[SS]][Z]"))
                    })?);
                }
                ("cert-authority", None) => {
                    return Err(err(
                        "cert-authority is not supported: list each signer's own key".into(),
                    ));
                }
                _ => {
                    return Err(err(format!(
                        "unknown option {option:?} (moorline knows namespaces, valid-after, valid-before)"
                    )));
                }
            }
        }
        out.push(signer);
    }
    Ok(out)
}

/// Options separated by commas outside double quotes.
fn split_options(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out.into_iter().filter(|o| !o.is_empty()).collect()
}

/// `YYYYMMDD[HHMM[SS]][Z]` as seconds since the epoch. Read as UTC, with or
/// without the `Z` (ssh-keygen reads a time without it as local time; a
/// server's is nearly always UTC, and the docs say so).
fn timestamp(text: &str) -> Option<i64> {
    let digits = text.strip_suffix(['Z', 'z']).unwrap_or(text);
    if !digits.chars().all(|c| c.is_ascii_digit()) || ![8, 12, 14].contains(&digits.len()) {
        return None;
    }
    let n = |range: std::ops::Range<usize>| {
        digits.get(range).map_or(Some(0), |s| s.parse::<i64>().ok())
    };
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(8..10)?, n(10..12)?, n(12..14)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A time as `2026-12-02 14:00:00 UTC`.
fn date(secs: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    let text = humantime::format_rfc3339_seconds(at).to_string();
    format!("{} UTC", text.trim_end_matches('Z').replace('T', " "))
}

/// The armored OpenPGP public keys of `openpgp_keys`, each with its
/// self-signatures checked (a key whose bindings do not verify is refused).
fn parse_openpgp(
    path: &Path,
    text: &str,
) -> Result<Vec<pgp::composed::SignedPublicKey>, TrustError> {
    use pgp::composed::Deserializable;
    let bad = |message: String| TrustError::OpenPgp {
        path: path.to_path_buf(),
        message,
    };
    // One armored block after another (`gpg --export --armor a b`, or
    // files appended): pgp reads one block at a time.
    const BEGIN: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";
    let mut out = Vec::new();
    for block in text.split(BEGIN).skip(1) {
        let block = format!("{BEGIN}{block}");
        let (keys, _) = pgp::composed::SignedPublicKey::from_string_many(&block)
            .map_err(|e| bad(format!("not armored OpenPGP public keys ({e})")))?;
        for key in keys {
            let key = key.map_err(|e| bad(format!("unreadable key ({e})")))?;
            key.verify_bindings()
                .map_err(|e| bad(format!("a key's self-signatures do not verify ({e})")))?;
            out.push(key);
        }
    }
    if out.is_empty() {
        return Err(bad("no public key".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_signers_lines_are_read_with_their_options_and_refused_by_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("allowed_signers");
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJJCTuhPiiGWBC0zHy3IGBFbb1aBZNuKK0V9XhvxjWDN";
        let text = format!(
            "# signers\n\nalice@example.com {key} laptop\n\
             bob@example.com,\"ci@example.com\" namespaces=\"git,file\",valid-after=\"20260101\",valid-before=\"20270102030405Z\" {key}\n"
        );
        let signers = parse_allowed_signers(&path, &text).expect("valid");
        assert_eq!(signers.len(), 2);
        assert_eq!(signers[0].principals, "alice@example.com");
        assert_eq!(signers[0].line, 3);
        assert_eq!(
            signers[1].namespaces,
            Some(vec!["git".into(), "file".into()])
        );
        assert_eq!(signers[1].valid_after, Some(1_767_225_600));
        assert_eq!(signers[1].valid_before, Some(1_798_859_045));
        let refused: &[(&str, &str)] = &[
            (
                "alice@example.com\n",
                "expected \"principals [options] keytype key\"",
            ),
            (
                &format!("alice@example.com cert-authority {key}\n"),
                "cert-authority is not supported: list each signer's own key",
            ),
            (
                &format!("alice@example.com valid-before=\"tomorrow\" {key}\n"),
                "valid-before \"tomorrow\" is not YYYYMMDD[HHMM[SS]][Z]",
            ),
            (
                &format!("alice@example.com no-touch-required {key}\n"),
                "unknown option \"no-touch-required\" (moorline knows namespaces, valid-after, valid-before)",
            ),
        ];
        for (text, want) in refused {
            let got = parse_allowed_signers(&path, text)
                .expect_err(text)
                .to_string();
            assert_eq!(got, format!("{}:1: {want}", path.display()));
        }
        let broken = parse_allowed_signers(&path, "a ssh-ed25519 AAAAnotakey\n")
            .expect_err("a broken key")
            .to_string();
        assert!(
            broken.starts_with(&format!(
                "{}:1: unreadable ssh-ed25519 key (",
                path.display()
            )),
            "{broken}"
        );
    }

    #[test]
    fn an_openpgp_keys_file_without_a_key_is_refused_by_name() {
        let path = Path::new("/home/ops/.config/moorline/trusted.asc");
        let err = |text: &str| match parse_openpgp(path, text) {
            Err(e) => e.to_string(),
            Ok(keys) => panic!("{} keys read from {text:?}", keys.len()),
        };
        assert_eq!(
            err("ssh-ed25519 AAAA\n"),
            "openpgp_keys \"/home/ops/.config/moorline/trusted.asc\": no public key"
        );
        let garbled = err(
            "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnot base64 at all\n-----END PGP PUBLIC KEY BLOCK-----\n",
        );
        assert!(
            garbled.starts_with("openpgp_keys \"/home/ops/.config/moorline/trusted.asc\": "),
            "{garbled}"
        );
    }

    #[test]
    fn timestamps_are_read_as_utc_and_dates_shown_so() {
        assert_eq!(timestamp("19700101"), Some(0));
        assert_eq!(timestamp("20261202"), Some(1_796_169_600));
        assert_eq!(
            timestamp("202612021430Z"),
            Some(1_796_169_600 + 14 * 3600 + 30 * 60)
        );
        assert_eq!(timestamp("2026120"), None);
        assert_eq!(timestamp("20261302"), None);
        assert_eq!(date(1_796_169_600), "2026-12-02 00:00:00 UTC");
    }

    #[test]
    fn an_unsigned_commit_or_a_foreign_signature_is_refused() {
        let trust = Trust {
            signers: vec![],
            signers_file: None,
            openpgp: vec![],
        };
        assert_eq!(trust.verify(None, b"x", 0), Err(Refusal::Unsigned));
        assert_eq!(
            trust.verify(Some("-----BEGIN SIGNED MESSAGE-----\n"), b"x", 0),
            Err(Refusal::BadSignature(
                "neither an SSH nor an OpenPGP signature (X.509 signatures are not supported)"
                    .into()
            ))
        );
    }
}
