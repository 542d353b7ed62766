//! `gworker volume ...` and `gworker secret ...`, through the Rust client.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use gworker_client::{Client, Secrets, Volume};

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Daemon URL: unix:///path/to.sock or http://host:port [default: the daemon's default socket].
    #[arg(long, env = "GWORKER_URL", value_name = "URL")]
    url: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    /// Create a named, persistent volume.
    Create {
        name: String,
        /// Size limit, e.g. 512M or 2G (at least 16M): writes past it fail with ENOSPC.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        quota: Option<u64>,
        /// Succeed if it exists already.
        #[arg(long)]
        exist_ok: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List volumes, or with NAME the files of a volume (under PATH).
    Ls {
        name: Option<String>,
        path: Option<String>,
        /// List recursively.
        #[arg(long, short = 'r')]
        recursive: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a volume and all its files; with PATH, remove only that path.
    Rm {
        name: String,
        path: Option<String>,
        /// Remove a directory and everything under it.
        #[arg(long, short = 'r')]
        recursive: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Upload a local file or directory (recursively) to REMOTE in the volume.
    Put {
        name: String,
        local: PathBuf,
        remote: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Download REMOTE (a file or directory) of the volume to LOCAL (`-`: stdout).
    Get {
        name: String,
        remote: String,
        local: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand, Debug)]
pub enum SecretCmd {
    /// Store a secret: KEY=VALUE pairs, KEY alone (its value from this
    /// environment, so it never shows in `ps`), and/or --from-dotenv FILE.
    Create {
        name: String,
        #[arg(value_name = "KEY=VALUE")]
        values: Vec<String>,
        /// Read KEY=VALUE lines from a dotenv file.
        #[arg(long, value_name = "FILE")]
        from_dotenv: Option<PathBuf>,
        /// Replace the secret if it exists.
        #[arg(long)]
        overwrite: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// List stored secrets (names only).
    Ls {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a stored secret.
    Rm {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match t[i..]
                .to_ascii_uppercase()
                .trim_end_matches("IB")
                .trim_end_matches('B')
            {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1u64 << 40,
                _ => return Err(format!("unknown size unit in {s:?}")),
            };
            (&t[..i], m)
        }
        None => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("expected a size like 512M or 2G, got {s:?}"))
}

/// Parses a dotenv file: `KEY=VALUE` lines, `export ` allowed, `#` comments,
/// values optionally in single quotes (literal) or double quotes (`\n`, `\"`, `\\`).
pub fn parse_dotenv(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {}: expected KEY=VALUE", i + 1));
        };
        let v = v.trim();
        let v = if let Some(inner) = v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
            inner.to_string()
        } else if let Some(inner) = v.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
            let mut s = String::new();
            let mut it = inner.chars();
            while let Some(c) = it.next() {
                if c == '\\' {
                    match it.next() {
                        Some('n') => s.push('\n'),
                        Some(o) => s.push(o),
                        None => s.push('\\'),
                    }
                } else {
                    s.push(c);
                }
            }
            s
        } else {
            // Unquoted: a ` #` starts a comment.
            v.split(" #").next().unwrap_or("").trim().to_string()
        };
        out.insert(k.trim().to_string(), v);
    }
    Ok(out)
}

fn client(conn: &Conn) -> Result<Client, String> {
    let r = match &conn.url {
        Some(u) if !u.is_empty() => Client::new(u, std::env::var("GWORKER_TOKEN").ok().as_deref()),
        _ => Client::from_env(),
    };
    r.map_err(|e| e.to_string())
}

fn runtime<F: std::future::Future<Output = Result<(), String>>>(f: F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(m) => {
            eprintln!("error: {m}");
            ExitCode::FAILURE
        }
    }
}

pub fn volume(cmd: VolumeCmd) -> ExitCode {
    runtime(async move {
        let e = |e: gworker_client::Error| e.to_string();
        match cmd {
            VolumeCmd::Create {
                name,
                quota,
                exist_ok,
                conn,
            } => {
                let c = client(&conn)?;
                let v = Volume::create(&c, &name, quota, exist_ok)
                    .await
                    .map_err(e)?;
                println!("{}", v.name);
            }
            VolumeCmd::Ls {
                name: None,
                json: j,
                conn,
                ..
            } => {
                let c = client(&conn)?;
                let list = Volume::list(&c).await.map_err(e)?;
                if j {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&list).unwrap_or_default()
                    );
                } else {
                    println!("{:<32} {:>12}", "NAME", "QUOTA");
                    for v in list {
                        let q = v
                            .quota_bytes
                            .map(|q| q.to_string())
                            .unwrap_or_else(|| "-".into());
                        println!("{:<32} {:>12}", v.name, q);
                    }
                }
            }
            VolumeCmd::Ls {
                name: Some(name),
                path,
                recursive,
                json: j,
                conn,
            } => {
                let c = client(&conn)?;
                let v = Volume::from_name(&c, &name, false).await.map_err(e)?;
                let entries = v
                    .listdir(path.as_deref().unwrap_or("/"), recursive)
                    .await
                    .map_err(e)?;
                if j {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&entries).unwrap_or_default()
                    );
                } else {
                    for en in entries {
                        let kind = match en.kind {
                            gworker_client::api::EntryKind::Dir => "dir",
                            gworker_client::api::EntryKind::File => "file",
                            gworker_client::api::EntryKind::Symlink => "link",
                            gworker_client::api::EntryKind::Other => "other",
                        };
                        println!("{kind:<5} {:>12}  {}", en.size, en.path);
                    }
                }
            }
            VolumeCmd::Rm {
                name,
                path: None,
                conn,
                ..
            } => {
                let c = client(&conn)?;
                Volume::delete(&c, &name).await.map_err(e)?;
            }
            VolumeCmd::Rm {
                name,
                path: Some(path),
                recursive,
                conn,
            } => {
                let c = client(&conn)?;
                let v = Volume::from_name(&c, &name, false).await.map_err(e)?;
                v.remove_file(&path, recursive).await.map_err(e)?;
            }
            VolumeCmd::Put {
                name,
                local,
                remote,
                conn,
            } => {
                let c = client(&conn)?;
                let v = Volume::from_name(&c, &name, false).await.map_err(e)?;
                let n = v.put(&local, &remote).await.map_err(e)?;
                eprintln!("uploaded {n} file(s)");
            }
            VolumeCmd::Get {
                name,
                remote,
                local,
                conn,
            } => {
                let c = client(&conn)?;
                let v = Volume::from_name(&c, &name, false).await.map_err(e)?;
                if local.as_os_str() == "-" {
                    let mut out = tokio::io::stdout();
                    v.read_file_into(&remote, &mut out).await.map_err(e)?;
                    tokio::io::AsyncWriteExt::flush(&mut out)
                        .await
                        .map_err(|x| x.to_string())?;
                } else {
                    let n = v.get(&remote, &local).await.map_err(e)?;
                    eprintln!("downloaded {n} file(s)");
                }
            }
        }
        Ok(())
    })
}

pub fn secret(cmd: SecretCmd) -> ExitCode {
    runtime(async move {
        let e = |e: gworker_client::Error| e.to_string();
        match cmd {
            SecretCmd::Create {
                name,
                values,
                from_dotenv,
                overwrite,
                conn,
            } => {
                let mut map = BTreeMap::new();
                if let Some(path) = from_dotenv {
                    let text = std::fs::read_to_string(&path)
                        .map_err(|x| format!("{}: {x}", path.display()))?;
                    map.extend(
                        parse_dotenv(&text).map_err(|x| format!("{}: {x}", path.display()))?,
                    );
                }
                for kv in values {
                    match kv.split_once('=') {
                        Some((k, v)) => {
                            map.insert(k.to_string(), v.to_string());
                        }
                        None => {
                            let v = std::env::var(&kv).map_err(|_| {
                                format!("{kv}: not KEY=VALUE and not set in this environment")
                            })?;
                            map.insert(kv, v);
                        }
                    }
                }
                if map.is_empty() {
                    return Err("give at least one KEY=VALUE (or --from-dotenv FILE)".into());
                }
                let c = client(&conn)?;
                let keys: Vec<String> = map.keys().cloned().collect();
                Secrets::create(&c, &name, map, overwrite)
                    .await
                    .map_err(e)?;
                eprintln!("stored secret {name} ({})", keys.join(", "));
            }
            SecretCmd::Ls { json: j, conn } => {
                let c = client(&conn)?;
                let list = Secrets::list(&c).await.map_err(e)?;
                if j {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&list).unwrap_or_default()
                    );
                } else {
                    for s in list {
                        println!("{}", s.name);
                    }
                }
            }
            SecretCmd::Rm { name, conn } => {
                let c = client(&conn)?;
                Secrets::delete(&c, &name).await.map_err(e)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_dotenv() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("x").is_err());
        let m = parse_dotenv("# c\nexport A=1\nB='x y'\nC=\"a\\nb\"\nD=v # note\n\n").unwrap();
        assert_eq!(m["A"], "1");
        assert_eq!(m["B"], "x y");
        assert_eq!(m["C"], "a\nb");
        assert_eq!(m["D"], "v");
    }
}
