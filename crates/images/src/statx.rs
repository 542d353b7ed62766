//! The statx fix: this gVisor (runsc 20221219) answers EINVAL to `statx()`
//! with `AT_NO_AUTOMOUNT`, which coreutils 9 passes on every `ls`, `cp`,
//! `mv`, `stat`. A sandbox has no automount points, so dropping the flag
//! changes nothing else.
//!
//! Two ways to drop it:
//! - **The image's own libc patched** (debian-slim, when its `libc.so.6`
//!   holds the exact `statx` code [`patch_bytes`] knows): costs nothing at
//!   run time.
//! - **A preloaded library** (`statx_fix.c` in `/etc/ld.so.preload`): works
//!   with any glibc, but every dynamically linked process loads it: ~1.1 ms
//!   per process under this gVisor (a bash loop of `/bin/true`: 6.2 ms a
//!   process with it, 5.1 without; `bench/RESULTS.md`, session 8).
//!
//! A patched image keeps the preloaded library at hand: a dpkg hook
//! (`statx-guard`) preloads it for every dpkg run (which may replace libc;
//! its maintainer scripts run `cp` and `mv`) and removes it afterwards only
//! if libc still carries the patch.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::recipe::write_file;
use crate::ImageError;

const IMG: &str = "debian-slim";

/// Where the library, the guard and glibc are, inside the rootfs.
const FIX_SO: &str = "usr/lib/gworker/statx-fix.so";
const GUARD: &str = "usr/lib/gworker/statx-guard";
const DPKG_HOOK: &str = "etc/dpkg/dpkg.cfg.d/gworker-statx";
const LIBC: &str = "usr/lib/x86_64-linux-gnu/libc.so.6";
/// Where an image's glibc may be: merged /usr (Debian 12), or /lib.
pub(crate) const LIBC_PATHS: [&str; 2] = [LIBC, "lib/x86_64-linux-gnu/libc.so.6"];

/// glibc's `statx` as Debian 12 (2.36) and 13 (2.41) build it for x86_64:
/// `mov %ecx,%r10d;
/// mov $0x14c,%eax; syscall`, then at +56 the 8-byte `nopl` that aligns
/// its error path at +64 (nothing jumps to +56).
const STATX_HEAD: [u8; 10] = [0x41, 0x89, 0xca, 0xb8, 0x4c, 0x01, 0x00, 0x00, 0x0f, 0x05];
const PAD_AT: usize = 56;
const STATX_PAD: [u8; 8] = [0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00];
/// The patch: `and $0xf7,%dh` (clears AT_NO_AUTOMOUNT, bit 11 of the
/// flags in %edx); `mov %ecx,%r10d`; `jmp +56` — and at +56: `mov
/// $0x14c,%eax; jmp +8` (back to the `syscall`); `int3`.
const PATCHED_HEAD: [u8; 8] = [0x80, 0xe6, 0xf7, 0x41, 0x89, 0xca, 0xeb, 0x30];
const PATCHED_PAD: [u8; 8] = [0xb8, 0x4c, 0x01, 0x00, 0x00, 0xeb, 0xc9, 0xcc];

/// Installs the fix into a Debian rootfs: libc patched when it can be
/// (with the dpkg guard), the preloaded library otherwise.
pub(crate) fn install(rootfs: &Path) -> Result<(), ImageError> {
    match install_patched_libc(&rootfs.join(LIBC), LIBC, rootfs) {
        Ok(true) => {
            // No preload: a rootfs built before this fix may have one.
            match fs::remove_file(rootfs.join("etc/ld.so.preload")) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Ok(false) => install_preload(rootfs),
        Err(e) => {
            tracing::warn!(error = %e, "cannot patch libc's statx; preloading the fix instead");
            install_preload(rootfs)
        }
    }
}

/// Installs the preloaded library (any glibc; what registry images get).
pub(crate) fn install_preload(rootfs: &Path) -> Result<(), ImageError> {
    compile_library(rootfs)?;
    fs::create_dir_all(rootfs.join("etc"))?;
    write_file(rootfs, "etc/ld.so.preload", &format!("/{FIX_SO}\n"))
}

/// Compiles `statx_fix.c` against the host's glibc, which is bookworm's
/// too; it needs only GLIBC_2.2.5 symbols, so any glibc loads it.
fn compile_library(rootfs: &Path) -> Result<(), ImageError> {
    const SOURCE: &str = include_str!("statx_fix.c");
    let so = rootfs.join(FIX_SO);
    let dir = so.parent().expect("FIX_SO has a directory");
    fs::create_dir_all(dir)?;
    let src = dir.join("statx-fix.c");
    fs::write(&src, SOURCE)?;
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&so)
        .arg(&src)
        .output()
        .map_err(|e| {
            build_err(format!(
                "cannot run the C compiler `cc` ({e}); install it with `apt-get install gcc`"
            ))
        })?;
    if !out.status.success() {
        return Err(build_err(format!(
            "compiling the statx fix failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// What [`patch_bytes`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Patch {
    /// Patched now; `statx` is at this file offset.
    Applied(u64),
    /// Already patched.
    Already(u64),
    /// Not a glibc whose `statx` this knows: untouched.
    Unknown,
}

/// Patches a glibc's `statx` in memory to drop `AT_NO_AUTOMOUNT`: only when
/// its code is exactly the one this knows (another glibc build is left
/// untouched).
pub(crate) fn patch_bytes(data: &mut [u8]) -> Patch {
    let Some(off) = statx_offset(data) else {
        return Patch::Unknown;
    };
    let at = |data: &[u8], from: usize, len: usize| {
        data.get(off + from..off + from + len).map(<[u8]>::to_vec)
    };
    if at(data, 0, 8).as_deref() == Some(&PATCHED_HEAD[..])
        && at(data, PAD_AT, 8).as_deref() == Some(&PATCHED_PAD[..])
    {
        return Patch::Already(off as u64);
    }
    if at(data, 0, STATX_HEAD.len()).as_deref() != Some(&STATX_HEAD[..])
        || at(data, PAD_AT, 8).as_deref() != Some(&STATX_PAD[..])
    {
        return Patch::Unknown;
    }
    data[off..off + 8].copy_from_slice(&PATCHED_HEAD);
    data[off + PAD_AT..off + PAD_AT + 8].copy_from_slice(&PATCHED_PAD);
    Patch::Applied(off as u64)
}

/// The fix for an image whose glibc is the regular file `libc` (at `rel` in
/// the image), written under `root` (the image's rootfs itself, or the diff
/// of a layer on top): its libc patched (the file replaced, not written
/// through), the preloadable library and the dpkg guard. `false` (nothing
/// written) when there is no such file or its `statx` is not one
/// [`patch_bytes`] knows.
pub(crate) fn install_patched_libc(
    libc: &Path,
    rel: &str,
    root: &Path,
) -> Result<bool, ImageError> {
    let Ok(meta) = libc.symlink_metadata() else {
        return Ok(false);
    };
    if !meta.is_file() {
        return Ok(false);
    }
    let mut data = fs::read(libc)?;
    let (Patch::Applied(offset) | Patch::Already(offset)) = patch_bytes(&mut data) else {
        return Ok(false);
    };
    let dest = root.join(rel);
    fs::create_dir_all(dest.parent().expect("LIBC has a directory"))?;
    let tmp = dest.with_extension("6.gworker-tmp");
    fs::write(&tmp, &data)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.permissions().mode()))?;
    fs::rename(&tmp, &dest)?;
    compile_library(root)?;
    install_guard(root, rel, offset)?;
    Ok(true)
}

/// The file offset of the dynamic symbol `statx` in an ELF file.
fn statx_offset(data: &[u8]) -> Option<usize> {
    use object::{Object, ObjectSegment, ObjectSymbol};
    let file = object::File::parse(data).ok()?;
    if file.architecture() != object::Architecture::X86_64 {
        return None;
    }
    let addr = file
        .dynamic_symbols()
        .find(|s| s.name() == Ok("statx") && s.is_definition())?
        .address();
    file.segments().find_map(|seg| {
        let (start, len) = seg.file_range();
        let inside = addr >= seg.address() && addr - seg.address() < len;
        inside.then(|| (start + (addr - seg.address())) as usize)
    })
}

/// The dpkg hook (see the module's doc) for the libc at `libc` (in the
/// image) patched at `offset`.
fn install_guard(rootfs: &Path, libc: &str, offset: u64) -> Result<(), ImageError> {
    let patched: String = PATCHED_HEAD.iter().map(|b| format!("{b:02x}")).collect();
    let script = format!(
        "#!/bin/sh\n\
         # gworker: this gVisor refuses statx() with AT_NO_AUTOMOUNT, which coreutils\n\
         # passes. The image's libc is patched to drop the flag; a dpkg run may\n\
         # replace libc, so the preloaded fix covers each dpkg run and stays on\n\
         # afterwards unless libc still carries the patch.\n\
         so=/{FIX_SO}\n\
         pre=/etc/ld.so.preload\n\
         case \"$1\" in\n\
         pre)\n\
         \x20   grep -qxF \"$so\" \"$pre\" 2>/dev/null || echo \"$so\" >> \"$pre\" ;;\n\
         post)\n\
         \x20   if [ \"$(od -An -tx1 -j {offset} -N 8 /{libc} | tr -d ' \\n')\" = {patched} ]; then\n\
         \x20       sed -i \"\\|^$so\\$|d\" \"$pre\"\n\
         \x20       [ -s \"$pre\" ] || rm -f \"$pre\"\n\
         \x20   fi ;;\n\
         esac\n\
         exit 0\n"
    );
    write_file(rootfs, GUARD, &script)?;
    fs::set_permissions(rootfs.join(GUARD), fs::Permissions::from_mode(0o755))?;
    fs::create_dir_all(rootfs.join("etc/dpkg/dpkg.cfg.d"))?;
    write_file(
        rootfs,
        DPKG_HOOK,
        &format!("pre-invoke=\"/{GUARD} pre\"\npost-invoke=\"/{GUARD} post\"\n"),
    )
}

fn build_err(message: String) -> ImageError {
    crate::recipe::build_err(IMG, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST_LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

    fn tmp_copy(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("gw-statx-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let p = d.join("libc.so.6");
        fs::copy(HOST_LIBC, &p).unwrap();
        p
    }

    #[test]
    fn bookworm_libc_is_patched_at_statx_once_and_nowhere_else() {
        let orig = fs::read(HOST_LIBC).unwrap();
        let off = statx_offset(&orig).expect("the host's libc defines statx");
        let mut new = orig.clone();
        if orig[off..off + STATX_HEAD.len()] != STATX_HEAD {
            // Not bookworm's glibc 2.36: it must be left alone.
            assert_eq!(patch_bytes(&mut new), Patch::Unknown);
            assert_eq!(new, orig);
            return;
        }
        assert_eq!(patch_bytes(&mut new), Patch::Applied(off as u64));
        assert_eq!(new.len(), orig.len());
        let changed: Vec<usize> = (0..new.len()).filter(|i| new[*i] != orig[*i]).collect();
        assert!(changed
            .iter()
            .all(|i| (off..off + 8).contains(i) || (off + PAD_AT..off + PAD_AT + 8).contains(i)));
        assert_eq!(new[off..off + 8], PATCHED_HEAD);
        assert_eq!(new[off + PAD_AT..off + PAD_AT + 8], PATCHED_PAD);
        // Again: recognised as patched, unchanged.
        let patched = new.clone();
        assert_eq!(patch_bytes(&mut new), Patch::Already(off as u64));
        assert_eq!(new, patched);
    }

    /// In a rootfs: libc replaced by its patched copy, with the library and
    /// the guard beside it; a second run finds it patched and keeps it.
    #[test]
    fn a_rootfs_gets_its_libc_patched_and_the_guard() {
        let orig = fs::read(HOST_LIBC).unwrap();
        let off = statx_offset(&orig).unwrap();
        if orig[off..off + STATX_HEAD.len()] != STATX_HEAD {
            return; // not bookworm's glibc: covered above
        }
        let p = tmp_copy("rootfs");
        let root = p.parent().unwrap().join("root");
        let libc = root.join(LIBC);
        fs::create_dir_all(libc.parent().unwrap()).unwrap();
        fs::rename(&p, &libc).unwrap();
        assert!(install_patched_libc(&libc, LIBC, &root).unwrap());
        let new = fs::read(&libc).unwrap();
        assert_eq!(new[off..off + 8], PATCHED_HEAD);
        assert!(root.join(FIX_SO).is_file());
        let guard = fs::read_to_string(root.join(GUARD)).unwrap();
        assert!(guard.contains(&format!("-j {off} -N 8 /{LIBC}")), "{guard}");
        assert!(install_patched_libc(&libc, LIBC, &root).unwrap());
        assert_eq!(fs::read(&libc).unwrap(), new);
        let _ = fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn unknown_code_and_non_elf_files_are_left_alone() {
        let p = tmp_copy("unknown");
        let root = p.parent().unwrap().join("root");
        let mut data = fs::read(&p).unwrap();
        let off = statx_offset(&data).unwrap();
        data[off + 2] ^= 0xff;
        let before = data.clone();
        assert_eq!(patch_bytes(&mut data), Patch::Unknown);
        assert_eq!(data, before);
        fs::write(&p, &data).unwrap();
        assert!(!install_patched_libc(&p, LIBC, &root).unwrap());
        assert_eq!(fs::read(&p).unwrap(), before);
        assert!(!root.exists(), "nothing written");
        fs::write(&p, b"not an ELF file").unwrap();
        assert!(!install_patched_libc(&p, LIBC, &root).unwrap());
        assert!(!install_patched_libc(&p.with_extension("missing"), LIBC, &root).unwrap());
        let _ = fs::remove_dir_all(p.parent().unwrap());
    }
}
