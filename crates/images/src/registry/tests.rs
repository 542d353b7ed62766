//! Unit tests of the registry client: references, URLs, challenges, and the
//! layer extraction (on crafted tars; needs root for chown/mknod).

use super::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

fn parse(s: &str) -> Reference {
    Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn parse_err(s: &str) -> String {
    match Reference::parse(s) {
        Ok(r) => panic!("{s:?} parsed as {r:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn docker_hub_references() {
    let r = parse("python:3.12-slim");
    assert_eq!(r.registry, DOCKER_HUB);
    assert_eq!(r.repository, "library/python");
    assert_eq!(r.tag.as_deref(), Some("3.12-slim"));
    assert_eq!(r.digest, None);
    assert_eq!(
        r.to_string(),
        "registry-1.docker.io/library/python:3.12-slim"
    );
    // Round trip.
    assert_eq!(parse(&r.to_string()), r);

    let r = parse("busybox");
    assert_eq!(r.to_string(), "registry-1.docker.io/library/busybox:latest");
    let r = parse("docker.io/library/busybox:1");
    assert_eq!(r.to_string(), "registry-1.docker.io/library/busybox:1");
    let r = parse("index.docker.io/someone/app");
    assert_eq!(r.to_string(), "registry-1.docker.io/someone/app:latest");
    let r = parse("someone/app:v2");
    assert_eq!(r.registry, DOCKER_HUB);
    assert_eq!(r.repository, "someone/app");
}

#[test]
fn registry_references() {
    let r = parse("127.0.0.1:5000/a/b:t");
    assert_eq!(r.registry, "127.0.0.1:5000");
    assert_eq!(r.repository, "a/b");
    assert_eq!(r.tag.as_deref(), Some("t"));
    let r = parse("localhost/x");
    assert_eq!(r.registry, "localhost");
    assert_eq!(r.repository, "x");
    assert_eq!(r.tag.as_deref(), Some("latest"));
    let r = parse("[::1]:5000/x/y:z");
    assert_eq!(r.registry, "[::1]:5000");
    assert_eq!(r.to_string(), "[::1]:5000/x/y:z");
    let r = parse("ghcr.io/o/r/deep/name:1.0_rc-2");
    assert_eq!(r.registry, "ghcr.io");
    assert_eq!(r.repository, "o/r/deep/name");
    let r = parse("reg.example.com:443/a__b/c-d--e.f:x");
    assert_eq!(r.repository, "a__b/c-d--e.f");
}

#[test]
fn digest_references() {
    let hex = "a".repeat(64);
    let r = parse(&format!("x@sha256:{hex}"));
    assert_eq!(r.registry, DOCKER_HUB);
    assert_eq!(r.repository, "library/x");
    assert_eq!(r.tag, None);
    assert_eq!(r.digest.as_deref(), Some(format!("sha256:{hex}").as_str()));
    assert_eq!(r.manifest_ref(), format!("sha256:{hex}"));
    let r = parse(&format!("127.0.0.1:5000/x:t@sha256:{hex}"));
    assert_eq!(r.tag.as_deref(), Some("t"));
    assert_eq!(r.manifest_ref(), format!("sha256:{hex}"));
    assert_eq!(r.to_string(), format!("127.0.0.1:5000/x:t@sha256:{hex}"));
    assert_eq!(parse(&r.to_string()), r);
}

#[test]
fn malformed_references() {
    for (s, want) in [
        ("", "empty"),
        ("Python:3", "must be lowercase"),
        ("a b", "whitespace"),
        ("http://127.0.0.1:5000/x", "no URL scheme"),
        ("x:", "tag \"\""),
        ("x:-bad", "tag"),
        ("x:a/b", "bad port"),
        ("x@sha256:abc", "64 lower-case hex"),
        ("x@md5:abc", "unsupported algorithm"),
        ("x@sha256", "ALGORITHM:HEX"),
        ("127.0.0.1:5000/", "no repository name"),
        ("127.0.0.1:99999/x", "out of range"),
        ("127.0.0.1:5x/x", "bad port"),
        ("a//b", "empty repository path component"),
        ("a/b/", "empty repository path component"),
        ("-a", "repository path component"),
        ("a..b", "repository path component"),
        ("a___b", "repository path component"),
        ("bad_host.-x.com/a", "bad host name"),
        ("[zz]:5/a", "bad IPv6"),
    ] {
        let e = parse_err(s);
        assert!(e.contains(want), "{s:?}: {e:?} should contain {want:?}");
        assert!(e.contains("invalid image reference"), "{e}");
    }
    let long = format!("reg.io/{}", "a".repeat(300));
    assert!(parse_err(&long).contains("255"));
    let hex = format!("x@sha256:{}", "A".repeat(64));
    assert!(parse_err(&hex).contains("lower-case"));
}

#[test]
fn plain_http_only_where_allowed() {
    let mut opts = PullOptions::default();
    for r in [
        "127.0.0.1:5000",
        "127.1.2.3",
        "localhost:80",
        "LOCALHOST",
        "[::1]:5000",
    ] {
        assert!(plain_http_allowed(r, &opts), "{r}");
        assert!(registry_base_url(r, &opts).starts_with("http://"), "{r}");
    }
    for r in [
        "example.com",
        "10.0.0.5:5000",
        "registry-1.docker.io",
        "[::2]:5000",
        "127.0.0.1.nip.io",
    ] {
        assert!(!plain_http_allowed(r, &opts), "{r}");
        assert!(registry_base_url(r, &opts).starts_with("https://"), "{r}");
    }
    opts.insecure_registries = vec!["10.0.0.5:5000".into(), "http://reg.lan/".into()];
    assert!(plain_http_allowed("10.0.0.5:5000", &opts));
    assert!(!plain_http_allowed("10.0.0.5:5001", &opts));
    assert!(plain_http_allowed("reg.lan", &opts));
    assert!(plain_http_allowed("reg.lan:8080", &opts));
    assert!(!plain_http_allowed("other.lan", &opts));
}

#[test]
fn plain_http_refused_before_connecting() {
    // A non-loopback host that is not insecure: a request for plain HTTP is
    // refused by check_url, which every request (registry, realm, redirect)
    // passes before connecting.
    let r = parse("10.255.255.1:5000/a:b");
    let opts = PullOptions::default();
    let c = Client::new(&r, &opts).unwrap();
    assert_eq!(c.base.scheme, "https");
    let e = c
        .check_url(&Url::parse("http://10.255.255.1:5000/v2/").unwrap())
        .unwrap_err();
    assert!(e.contains("refusing plain HTTP"), "{e}");
    assert!(e.contains("--insecure-registry 10.255.255.1:5000"), "{e}");
    c.check_url(&Url::parse("https://10.255.255.1:5000/v2/").unwrap())
        .unwrap();
    c.check_url(&Url::parse("http://127.0.0.1:9/token").unwrap())
        .unwrap();
}

#[test]
fn urls() {
    let u = Url::parse("https://Reg.IO:5000/v2/a/blobs/x?y=1#frag").unwrap();
    assert_eq!(u.authority, "reg.io:5000");
    assert_eq!(u.path_query, "/v2/a/blobs/x?y=1");
    assert_eq!(
        u.join("/other?q").unwrap().to_string(),
        "https://reg.io:5000/other?q"
    );
    assert_eq!(
        u.join("rel/z").unwrap().to_string(),
        "https://reg.io:5000/v2/a/blobs/rel/z"
    );
    assert_eq!(
        u.join("//cdn.example/p").unwrap().to_string(),
        "https://cdn.example/p"
    );
    assert_eq!(
        u.join("http://cdn.example/p").unwrap().to_string(),
        "http://cdn.example/p"
    );
    assert!(Url::parse("ftp://x/").is_err());
    assert!(Url::parse("https://user@x/").is_err());
    assert_eq!(Url::parse("http://h").unwrap().path_query, "/");
    assert_eq!(
        urlencode("repository:a/b:pull"),
        "repository%3Aa%2Fb%3Apull"
    );
}

#[test]
fn challenges() {
    let (s, p) = parse_challenge(
        r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull,push""#,
    )
    .unwrap();
    assert_eq!(s, "bearer");
    assert_eq!(
        p,
        vec![
            ("realm".into(), "https://auth.docker.io/token".into()),
            ("service".into(), "registry.docker.io".into()),
            ("scope".into(), "repository:library/python:pull,push".into()),
        ]
    );
    let (s, p) = parse_challenge(r#"Basic realm="a \"quoted\" realm""#).unwrap();
    assert_eq!(s, "basic");
    assert_eq!(p, vec![("realm".into(), "a \"quoted\" realm".into())]);
    let (s, p) = parse_challenge("Bearer realm=http://x/t, service=svc").unwrap();
    assert_eq!(s, "bearer");
    assert_eq!(p[0], ("realm".into(), "http://x/t".into()));
    assert_eq!(p[1], ("service".into(), "svc".into()));
    assert!(parse_challenge("   ").is_none());
}

#[test]
fn manifests_and_platforms() {
    let list = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.list.v2+json",
      "manifests":[
        {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}},
        {"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":1,"platform":{"architecture":"amd64","os":"linux"}},
        {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","size":1,"platform":{"architecture":"unknown","os":"unknown"}}]}"#;
    let Manifest::Index(entries) = parse_manifest(list, "", "x").unwrap() else {
        panic!("not an index")
    };
    assert_eq!(
        pick_platform(&entries, "x").unwrap().digest,
        format!("sha256:{}", "2".repeat(64))
    );
    let e = pick_platform(&entries[..1], "img").unwrap_err();
    assert!(
        e.contains("no linux/amd64 image in img (it has: linux/arm64/v8)"),
        "{e}"
    );
    // An OCI manifest without mediaType, told by the Content-Type.
    let m = br#"{"schemaVersion":2,"config":{"digest":"sha256:aa","size":2},"layers":[]}"#;
    assert!(matches!(
        parse_manifest(m, MEDIA_OCI_MANIFEST, "x").unwrap(),
        Manifest::Image { .. }
    ));
    let s1 = br#"{"schemaVersion":1,"name":"x","fsLayers":[]}"#;
    assert!(parse_manifest(s1, MEDIA_DOCKER_SCHEMA1_SIGNED, "x")
        .err()
        .unwrap()
        .contains("schema 1"));
    assert!(parse_manifest(b"nope", "", "x")
        .err()
        .unwrap()
        .contains("not valid JSON"));
    assert_eq!(
        split_env(&["A=1".into(), "B=x=y".into(), "C".into(), "".into()]),
        vec![
            ("A".into(), "1".into()),
            ("B".into(), "x=y".into()),
            ("C".into(), String::new())
        ]
    );
}

// --- extraction ------------------------------------------------------------------

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "gw-reg-unit-{tag}-{}-{}",
            std::process::id(),
            UNIQUE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone, Copy)]
enum Kind<'a> {
    File(&'a [u8]),
    Dir,
    Symlink(&'a str),
    Hard(&'a str),
    Char(u32, u32),
    Fifo,
}

/// A tar with raw (unchecked) paths, as an attacker could make it.
fn tar_of(entries: &[(&str, Kind<'_>, u32, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, kind, mode, uid) in entries {
        let mut h = tar::Header::new_ustar();
        let data: &[u8] = match kind {
            Kind::File(d) => d,
            _ => b"",
        };
        // Write the name bytes directly: set_path refuses "..".
        let name = path.as_bytes();
        assert!(name.len() < 100);
        {
            let raw = h.as_old_mut();
            raw.name[..name.len()].copy_from_slice(name);
        }
        h.set_mode(*mode);
        h.set_uid(*uid);
        h.set_gid(*uid);
        h.set_mtime(1_600_000_000);
        h.set_size(data.len() as u64);
        match kind {
            Kind::File(_) => h.set_entry_type(tar::EntryType::Regular),
            Kind::Dir => h.set_entry_type(tar::EntryType::Directory),
            Kind::Symlink(t) | Kind::Hard(t) => {
                h.set_entry_type(if matches!(kind, Kind::Symlink(_)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                let t = t.as_bytes();
                let raw = h.as_old_mut();
                raw.linkname[..t.len()].copy_from_slice(t);
            }
            Kind::Char(ma, mi) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
            }
            Kind::Fifo => h.set_entry_type(tar::EntryType::Fifo),
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

#[test]
fn extract_overlay_format() {
    if !is_root() {
        eprintln!("skipped: needs root (chown, mknod)");
        return;
    }
    let t = TempDir::new("fmt");
    let tar = tar_of(&[
        ("./", Kind::Dir, 0o755, 0),
        ("./etc/", Kind::Dir, 0o755, 0),
        (
            "./etc/passwd",
            Kind::File(b"root:x:0:0::/root:/bin/sh\n"),
            0o644,
            0,
        ),
        ("etc/.wh.shadow", Kind::File(b""), 0o644, 0),
        ("opq/.wh..wh..opq", Kind::File(b""), 0o644, 0),
        ("opq/new", Kind::File(b"n"), 0o600, 0),
        ("x/.wh..wh.plnk", Kind::File(b""), 0o644, 0),
        ("/abs/file", Kind::File(b"abs"), 0o644, 0),
        ("bin/suid", Kind::File(b"#!"), 0o4755, 0),
        ("home/u/f", Kind::File(b"u"), 0o640, 1000),
        ("link", Kind::Symlink("/etc/passwd"), 0o777, 1000),
        ("hard", Kind::Hard("etc/passwd"), 0o644, 0),
        ("dev/null", Kind::Char(1, 3), 0o666, 0),
        ("fifo", Kind::Fifo, 0o620, 0),
        ("replaced", Kind::File(b"old"), 0o644, 0),
        ("replaced", Kind::File(b"new!"), 0o644, 0),
    ]);
    let stats = extract_tar(&tar[..], &t.0).unwrap();
    assert_eq!(stats.skipped_devices, 1);
    assert_eq!(stats.whiteouts, 2);
    let root = &t.0;
    // Whiteout: char device 0:0.
    let m = fs::symlink_metadata(root.join("etc/shadow")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), 0);
    assert!(!root.join("etc/.wh.shadow").exists());
    // Opaque dir: xattr, and no marker file.
    let mut v = [0u8; 8];
    let c = cpath(&root.join("opq")).unwrap();
    let name = CString::new("trusted.overlay.opaque").unwrap();
    // SAFETY: valid strings and buffer.
    let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
    assert_eq!(n, 1);
    assert_eq!(v[0], b'y');
    assert!(!root.join("opq/.wh..wh..opq").exists());
    assert!(!root.join("x/.wh..wh.plnk").exists());
    assert_eq!(fs::read(root.join("abs/file")).unwrap(), b"abs");
    let m = fs::metadata(root.join("bin/suid")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o4755);
    let m = fs::metadata(root.join("home/u/f")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1000, 0o640));
    assert_eq!(m.mtime(), 1_600_000_000);
    let m = fs::symlink_metadata(root.join("link")).unwrap();
    assert!(m.file_type().is_symlink());
    assert_eq!(m.uid(), 1000);
    assert_eq!(m.mtime(), 1_600_000_000);
    assert_eq!(
        fs::read_link(root.join("link")).unwrap(),
        Path::new("/etc/passwd")
    );
    let a = fs::metadata(root.join("hard")).unwrap();
    let b = fs::metadata(root.join("etc/passwd")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert!(!root.join("dev/null").exists());
    let m = fs::symlink_metadata(root.join("fifo")).unwrap();
    assert!(m.file_type().is_fifo());
    assert_eq!(m.mode() & 0o7777, 0o620);
    assert_eq!(fs::read(root.join("replaced")).unwrap(), b"new!");
    assert_eq!(
        fs::metadata(root.join("etc")).unwrap().mtime(),
        1_600_000_000
    );
    assert_eq!(stats.unpacked_bytes, 26 + 1 + 3 + 2 + 1 + 3 + 4);
}

#[test]
fn extract_refuses_escapes() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            tar_of(&[("../escape", Kind::File(b"x"), 0o644, 0)]),
            "unsafe path",
        ),
        (
            "dotdot-inner",
            tar_of(&[("a/../../escape", Kind::File(b"x"), 0o644, 0)]),
            "unsafe path",
        ),
        (
            "symlink-parent",
            tar_of(&[
                ("evil", Kind::Symlink("/tmp"), 0o777, 0),
                ("evil/escape", Kind::File(b"x"), 0o644, 0),
            ]),
            "goes through the symlink",
        ),
        (
            "symlink-parent-whiteout",
            tar_of(&[
                ("evil", Kind::Symlink("/etc"), 0o777, 0),
                ("evil/.wh.passwd", Kind::File(b""), 0o644, 0),
            ]),
            "goes through the symlink",
        ),
        (
            "hardlink-out",
            tar_of(&[("h", Kind::Hard("../../etc/passwd"), 0o644, 0)]),
            "unsafe path",
        ),
        (
            "hardlink-abs",
            tar_of(&[("h", Kind::Hard("/etc/passwd"), 0o644, 0)]),
            "is not a directory of this layer",
        ),
        (
            "hardlink-missing",
            tar_of(&[("h", Kind::Hard("nothing"), 0o644, 0)]),
            "target not in this layer",
        ),
        (
            "hardlink-via-symlink",
            tar_of(&[
                ("s", Kind::Symlink("/etc"), 0o777, 0),
                ("h", Kind::Hard("s/passwd"), 0o644, 0),
            ]),
            "not a directory of this layer",
        ),
    ];
    for (name, tar, want) in cases {
        let outer = TempDir::new(name);
        let root = outer.0.join("root");
        fs::create_dir(&root).unwrap();
        let e = extract_tar(&tar[..], &root).unwrap_err();
        assert!(e.contains(want), "{name}: {e}");
        assert!(!outer.0.join("escape").exists(), "{name}");
    }
    assert!(!Path::new("/tmp/escape").exists());
}

#[test]
fn extract_compressed_streams() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // The same tar, zstd-compressed, through the sniffing path of a download
    // would pick the zstd decoder; here: the decoders themselves.
    let tar = tar_of(&[("f", Kind::File(b"zstd content"), 0o644, 0)]);
    let z = zstd::stream::encode_all(&tar[..], 3).unwrap();
    let t = TempDir::new("zstd");
    let dec = zstd::stream::read::Decoder::new(&z[..]).unwrap();
    extract_tar(dec, &t.0).unwrap();
    assert_eq!(fs::read(t.0.join("f")).unwrap(), b"zstd content");

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let t = TempDir::new("gz");
    extract_tar(flate2::read::MultiGzDecoder::new(&gz[..]), &t.0).unwrap();
    assert_eq!(fs::read(t.0.join("f")).unwrap(), b"zstd content");
}

#[test]
fn stale_tmp_dirs_are_removed() {
    let t = TempDir::new("stale");
    let hex = "b".repeat(64);
    // pid 0x7fffffff does not exist.
    let stale = t.0.join(format!(".tmp-{hex}-2147483647-0"));
    let mine = t.0.join(format!(".tmp-{hex}-{}-0", std::process::id()));
    let other = t.0.join(".locks");
    // An image build's temp layer (16-hex key): not ours to remove.
    let build = t.0.join(".tmp-0123456789abcdef-2147483647-0");
    for d in [&stale, &mine, &other, &build] {
        fs::create_dir_all(d.join("diff")).unwrap();
    }
    remove_stale_tmp(&t.0);
    assert!(!stale.exists());
    assert!(mine.exists());
    assert!(other.exists());
    assert!(build.exists());
}
