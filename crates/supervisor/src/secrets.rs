//! A sandbox's secret environment, held in the supervisor's memory only.
//!
//! The daemon hands the values over an inherited pipe when it starts the
//! supervisor (never in `launch.json`); the supervisor applies them to every
//! process it spawns, so execs after a daemon restart get them too, and they
//! are gone when the sandbox is. Precedence: image env < secrets (in order)
//! < the sandbox's `env=` < the exec's `env=` (the last two are named in
//! [`ProcSpec::over_secrets`]).

use std::io::Read;
use std::os::unix::io::FromRawFd;
use std::sync::OnceLock;

use crate::wire::ProcSpec;

static SECRETS: OnceLock<Vec<(String, String)>> = OnceLock::new();

/// Reads the secrets from `fd` to its end and closes it. Call once, before
/// any process is spawned.
pub fn load(fd: i32) -> std::io::Result<()> {
    // SAFETY: the daemon passes the pipe's read end as `fd`; nothing else owns it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    drop(f);
    let list: Vec<(String, String)> = serde_json::from_slice(&buf).map_err(|_| {
        // serde's message could quote a value: never repeat it.
        std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed secrets")
    })?;
    buf.iter_mut().for_each(|b| *b = 0);
    let _ = SECRETS.set(list);
    Ok(())
}

/// Sets the secrets of a warm-pool sandbox at its claim (it booted without
/// any). False if it has secrets already.
pub fn set(list: Vec<(String, String)>) -> bool {
    SECRETS.set(list).is_ok()
}

/// `spec.env` with the secrets applied, as `KEY=VALUE` byte strings.
pub fn env_for(spec: &ProcSpec) -> Vec<Vec<u8>> {
    apply(SECRETS.get().map(|v| v.as_slice()).unwrap_or(&[]), spec)
}

fn apply(secrets: &[(String, String)], spec: &ProcSpec) -> Vec<Vec<u8>> {
    let mut env: Vec<String> = spec.env.clone();
    for (k, v) in secrets {
        if spec.over_secrets.iter().any(|o| o == k) {
            continue;
        }
        let entry = format!("{k}={v}");
        let prefix = format!("{k}=");
        match env.iter_mut().find(|e| e.starts_with(&prefix)) {
            Some(e) => *e = entry,
            None => env.push(entry),
        }
    }
    env.into_iter().map(String::into_bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_override_the_image_and_yield_to_env() {
        let spec = ProcSpec {
            argv: vec!["env".into()],
            env: vec!["PATH=/bin".into(), "A=image".into(), "B=user".into()],
            cwd: "/".into(),
            mkdir_cwd: false,
            over_secrets: vec!["B".into()],
        };
        let secrets = vec![
            ("A".to_string(), "s1".to_string()),
            ("B".to_string(), "s1".to_string()),
            ("C".to_string(), "s1".to_string()),
            ("C".to_string(), "s2".to_string()),
        ];
        let env: Vec<String> = apply(&secrets, &spec)
            .into_iter()
            .map(|e| String::from_utf8(e).unwrap())
            .collect();
        assert_eq!(env, ["PATH=/bin", "A=s1", "B=user", "C=s2"]);
    }
}
