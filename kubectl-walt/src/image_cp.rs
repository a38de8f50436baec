//! `image cp SRC DST`: files into an image (a new layer, through an image shell session whose
//! result overwrites the image) or out of it (the session is discarded).
//!
//! The transfer goes through the shell pod's TTY, as a tar archive in base64 lines framed by
//! markers the shell prints (the markers are assembled by `printf` so that the echoed command
//! line never contains them). It needs `tar`, `base64` and `mktemp` in the image (busybox and
//! Debian have them).

use std::io::Read as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walt_crds::{ImageName, ShellMode, ShellSessionPhase, ShellSessionSpec};

use crate::cluster::Ctx;
use crate::error::{Error, Result};
use crate::resolve::image_name;
use crate::session::{self, Created};
use crate::watch::interruptible;

/// One side of `image cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A path on this machine.
    Local(PathBuf),
    /// A path inside an image.
    Image {
        /// The image.
        image: ImageName,
        /// The absolute path inside it.
        path: String,
    },
}

/// Parses `IMAGE:PATH` or a local path (anything with `/` before the first `:`, or no `:`).
pub fn parse_location(text: &str) -> Result<Location> {
    match text.split_once(':') {
        Some((image, path)) if !image.contains('/') && !image.is_empty() => {
            let image = image_name(image)?;
            if !path.starts_with('/') {
                return Err(Error::Invalid(format!(
                    "the path inside image {image} must be absolute: {image}:/{path}"
                )));
            }
            Ok(Location::Image {
                image,
                path: path.to_string(),
            })
        }
        _ => Ok(Location::Local(PathBuf::from(text))),
    }
}

/// Quotes a string for a POSIX shell.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Splits an absolute image path into its directory and last component.
fn split_remote(path: &str) -> Result<(String, String)> {
    let trimmed = path.trim_end_matches('/');
    let (dir, base) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    if base.is_empty() || base == "." || base == ".." {
        return Err(Error::Invalid(format!(
            "{path:?} does not name a file or directory to copy"
        )));
    }
    Ok((
        if dir.is_empty() {
            "/".into()
        } else {
            dir.to_string()
        },
        base.to_string(),
    ))
}

/// The shell script that sends `path` out as base64 tar between markers.
pub fn export_script(path: &str) -> Result<String> {
    let (dir, base) = split_remote(path)?;
    Ok(format!(
        "stty -echo 2>/dev/null; if [ -e {p} ]; then printf '%s%s\\n' __WALT_ BEGIN__; tar -c -C {d} {b} | base64; printf '%s%s\\n' __WALT_ END__; else printf '%s%s\\n' __WALT_ MISSING__; fi; exit\n",
        p = quote(path),
        d = quote(&dir),
        b = quote(&base),
    ))
}

/// Where `image cp` puts what it copies into an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// `IMAGE:/opt/`: inside that directory, created when missing (like `cp -r x /opt/` with the
    /// directory made first).
    IntoDirectory,
    /// `IMAGE:/opt/name`: that new name, or inside it when it is a directory that exists.
    NameOrDirectory,
}

/// The shell script that receives base64 tar lines (ended by EOF) holding `base` and puts it at
/// `dest` as [`Destination`] says.
pub fn import_script(base: &str, dest: &str, destination: Destination) -> String {
    let place = match destination {
        Destination::IntoDirectory => "mkdir -p {d} && mv \"$t\"/{b} {d}/",
        Destination::NameOrDirectory => "if [ -d {d} ]; then mv \"$t\"/{b} {d}/; else mv \"$t\"/{b} {d}; fi",
    }
    .replace("{d}", &quote(dest))
    .replace("{b}", &quote(base));
    format!(
        "stty -echo 2>/dev/null; t=$(mktemp -d) && base64 -d | tar -x -C \"$t\" && {place}; printf '%s%s %s\\n' __WALT_ DONE__ $?; rm -rf \"$t\"; exit\n"
    )
}

/// Extracts the base64 payload between the markers of [`export_script`] from the TTY output.
pub fn extract_payload(output: &str) -> Result<Vec<u8>> {
    let lines: Vec<&str> = output.split('\n').map(|l| l.trim_end_matches('\r')).collect();
    if lines.iter().any(|l| l.trim() == "__WALT_MISSING__") {
        return Err(Error::Invalid("no such file or directory in the image".into()));
    }
    let begin = lines
        .iter()
        .position(|l| l.trim() == "__WALT_BEGIN__")
        .ok_or_else(|| {
            Error::Failed("the image shell sent no data (is `tar` or `base64` missing in the image?)".into())
        })?;
    let end = lines[begin..]
        .iter()
        .position(|l| l.trim() == "__WALT_END__")
        .map(|p| p + begin)
        .ok_or_else(|| Error::Failed("the transfer from the image was cut short".into()))?;
    let text: String = lines[begin + 1..end]
        .iter()
        .flat_map(|l| l.trim().chars())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| Error::Failed(format!("the data from the image is damaged ({e})")))
}

/// `image cp SRC DST`
pub async fn run(ctx: &Ctx, src: &str, dst: &str, yes: bool) -> Result<i32> {
    match (parse_location(src)?, parse_location(dst)?) {
        (Location::Image { image, path }, Location::Local(local)) => {
            copy_out(ctx, &image, &path, &local).await
        }
        (Location::Local(local), Location::Image { image, path }) => {
            copy_in(ctx, &local, &image, &path, yes).await
        }
        (Location::Local(_), Location::Local(_)) => Err(Error::Invalid(
            "one side of `image cp` must be IMAGE:PATH (e.g. rpi-debian:/etc/hostname)".into(),
        )),
        (Location::Image { .. }, Location::Image { .. }) => Err(Error::Invalid(
            "`image cp` copies between this machine and an image: copy to a local path first".into(),
        )),
    }
}

async fn start_session(ctx: &Ctx, image: &ImageName) -> Result<(Created, session::RuntimePod)> {
    ctx.get_image(&image.object_name(), &image.to_string()).await?;
    let spec = ShellSessionSpec {
        image: Some(image.to_string()),
        mode: ShellMode::Basic,
        ..session::spec_defaults()
    };
    let created = session::create(ctx, &image.object_name(), spec).await?;
    let started = created
        .follow(ctx, &format!("opening {image}:"), &|s| {
            session::running(s) && s.status.as_ref().is_some_and(|st| st.pod.is_some())
        })
        .await;
    match started {
        Ok(s) => {
            if let Some(pod) = session::shell_pod(ctx, &s) {
                Ok((created, pod))
            } else {
                created.delete(ctx).await;
                Err(Error::Failed(
                    "the shell session runs but names no shell pod".into(),
                ))
            }
        }
        Err(e) => {
            created.delete(ctx).await;
            Err(e)
        }
    }
}

/// Sends `input` (then, if `eof`, an end-of-file on the TTY), and collects the output until the
/// shell exits.
/// What the shell prints once it reads what is typed ([`READY_PROBE`] typed shows the quotes, so the
/// typed line's own echo never matches).
const READY_MARKER: &[u8] = b"__WALT_READY__";
/// Typed until the shell answers [`READY_MARKER`].
const READY_PROBE: &[u8] = b"echo __WALT_\"\"READY__\n";
/// How often the probe is typed again, and for how long.
const READY_PROBE_EVERY: std::time::Duration = std::time::Duration::from_millis(300);
const READY_WITHIN: std::time::Duration = std::time::Duration::from_mins(2);

/// Whether `out`, of which the last `new` bytes just arrived, now holds `marker` (only the new bytes
/// and the marker's length before them are searched).
fn newly_holds(out: &[u8], new: usize, marker: &[u8]) -> bool {
    let from = out.len().saturating_sub(new + marker.len());
    out[from..].windows(marker.len()).any(|window| window == marker)
}

/// Types `script` (then `payload`, in base64 lines ended by VEOF) into the shell of `pod` once the shell
/// answers, and returns everything the terminal showed until the shell ended. What is typed before
/// the image's shell reads its terminal can be lost (a TTY container attached before its process
/// runs, a runtime that sets the terminal up): under load, the start of the script was, and the
/// payload's lines and VEOF then went to the shell as commands (the copy "not confirmed"). So a
/// probe is typed until the shell echoes its marker, and only then the script.
async fn converse(
    ctx: &Ctx,
    pod: &session::RuntimePod,
    script: &str,
    payload: Option<&str>,
) -> Result<String> {
    let mut attached = pod.attach_tty(ctx).await?;
    let mut stdin = attached
        .stdin()
        .ok_or_else(|| Error::Failed("the shell pod gave no stdin".into()))?;
    let mut stdout = attached
        .stdout()
        .ok_or_else(|| Error::Failed("the shell pod gave no output".into()))?;
    let (answered, mut ready) = tokio::sync::watch::channel(false);
    let writer = async {
        let probing = async {
            while !*ready.borrow_and_update() {
                stdin.write_all(READY_PROBE).await?;
                stdin.flush().await?;
                let _ = tokio::time::timeout(READY_PROBE_EVERY, ready.changed()).await;
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::time::timeout(READY_WITHIN, probing).await.map_err(|_| {
            std::io::Error::other(format!("the image shell did not answer within {READY_WITHIN:?}"))
        })??;
        stdin.write_all(script.as_bytes()).await?;
        if let Some(data) = payload {
            for chunk in data.as_bytes().chunks(76) {
                stdin.write_all(chunk).await?;
                stdin.write_all(b"\n").await?;
            }
            // VEOF at the start of a line: end of input for `base64 -d`.
            stdin.write_all(b"\x04").await?;
        }
        stdin.flush().await?;
        Ok::<_, std::io::Error>(())
    };
    let reader = async {
        let mut out = Vec::new();
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let read = stdout.read(&mut buffer).await?;
            if read == 0 {
                return Ok::<_, std::io::Error>(out);
            }
            out.extend_from_slice(&buffer[..read]);
            if !*answered.borrow() && newly_holds(&out, read, READY_MARKER) {
                answered.send_replace(true);
            }
        }
    };
    // A writer that fails (the shell never answered) ends the conversation: its reader would wait.
    let ((), out) = tokio::try_join!(writer, reader).map_err(Error::io("talking to the image shell"))?;
    attached.abort();
    Ok(String::from_utf8_lossy(&out).into_owned())
}

async fn copy_out(ctx: &Ctx, image: &ImageName, path: &str, local: &Path) -> Result<i32> {
    let script = export_script(path)?;
    let (created, pod) = start_session(ctx, image).await?;
    let outcome = interruptible(async {
        let output = converse(ctx, &pod, &script, None).await?;
        let tar = extract_payload(&output).map_err(|e| match e {
            Error::Invalid(m) => Error::Invalid(format!("{image}:{path}: {m}")),
            other => other,
        })?;
        let (_, base) = split_remote(path)?;
        unpack_local(&tar, &base, local)
    })
    .await;
    let _ = created
        .patch_spec(ctx, serde_json::json!({"discard": true}))
        .await;
    created.delete(ctx).await;
    outcome?;
    println!("Copied {image}:{path} to {}.", local.display());
    Ok(0)
}

/// Unpacks the archive holding `base` to `dest` (inside it when it is a directory), refusing
/// entries that would escape (the tar crate's `unpack_in` checks every path).
fn unpack_local(tar_bytes: &[u8], base: &str, dest: &Path) -> Result<()> {
    let (target_dir, final_path) = if dest.is_dir() {
        (dest.to_path_buf(), dest.join(base))
    } else {
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        (parent.to_path_buf(), dest.to_path_buf())
    };
    let staging = tempfile::Builder::new()
        .prefix(".walt-cp-")
        .tempdir_in(&target_dir)
        .map_err(Error::io(format!("cannot write in {}", target_dir.display())))?;
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive
        .entries()
        .map_err(Error::io("reading the archive from the image"))?
    {
        let mut entry = entry.map_err(Error::io("reading the archive from the image"))?;
        let ok = entry
            .unpack_in(staging.path())
            .map_err(Error::io(format!("writing into {}", staging.path().display())))?;
        if !ok {
            return Err(Error::Failed(
                "the archive from the image holds a path that escapes; refused".into(),
            ));
        }
    }
    std::fs::rename(staging.path().join(base), &final_path)
        .map_err(Error::io(format!("cannot create {}", final_path.display())))?;
    Ok(())
}

/// Packs a local file or directory as a tar archive whose top entry is `base`.
fn pack_local(local: &Path, base: &str) -> Result<Vec<u8>> {
    let meta =
        std::fs::symlink_metadata(local).map_err(Error::io(format!("cannot read {}", local.display())))?;
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    if meta.is_dir() {
        builder
            .append_dir_all(base, local)
            .map_err(Error::io(format!("cannot pack {}", local.display())))?;
    } else {
        let mut file =
            std::fs::File::open(local).map_err(Error::io(format!("cannot read {}", local.display())))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(Error::io(format!("cannot read {}", local.display())))?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata(&meta);
        header.set_size(data.len() as u64);
        builder
            .append_data(&mut header, base, data.as_slice())
            .map_err(Error::io(format!("cannot pack {}", local.display())))?;
    }
    builder
        .into_inner()
        .map_err(Error::io("cannot finish the archive"))
}

async fn copy_in(ctx: &Ctx, local: &Path, image: &ImageName, path: &str, yes: bool) -> Result<i32> {
    let base = local
        .file_name()
        .and_then(|b| b.to_str())
        .ok_or_else(|| Error::Invalid(format!("{} does not name a file or directory", local.display())))?
        .to_string();
    let archive = pack_local(local, &base)?;
    let payload = base64::engine::general_purpose::STANDARD.encode(&archive);
    // `/opt/` means "into /opt" (made when missing); a path without the slash is the new name
    // (or a directory that exists in the image, decided there).
    let (dest, destination) = if path.ends_with('/') && path.len() > 1 {
        (path.trim_end_matches('/').to_string(), Destination::IntoDirectory)
    } else {
        (path.to_string(), Destination::NameOrDirectory)
    };
    let booted_by = crate::image_cmd::confirm_overwrite(ctx, image, yes, "not copied").await?;
    let script = import_script(&base, &dest, destination);
    let (created, pod) = start_session(ctx, image).await?;
    let outcome = interruptible(async {
        let output = converse(ctx, &pod, &script, Some(&payload)).await?;
        let status = output
            .split('\n')
            .find_map(|l| l.trim().strip_prefix("__WALT_DONE__ ").map(str::to_string))
            .ok_or_else(|| Error::Failed("the image shell did not confirm the copy (is `tar`, `base64` or `mktemp` missing in the image?)".into()))?;
        if status.trim() != "0" {
            return Err(Error::Failed(format!(
                "copying into {image}:{path} failed in the image (exit status {}); does the directory exist?",
                status.trim()
            )));
        }
        let session = created
            .follow(ctx, "saving:", &|s| {
                s.status.as_ref().is_some_and(|st| {
                    matches!(st.phase, ShellSessionPhase::AwaitingDecision | ShellSessionPhase::Discarded)
                })
            })
            .await?;
        if session.status.is_some_and(|s| s.phase == ShellSessionPhase::Discarded) {
            return Err(Error::Failed("the image shell saw no change; nothing was copied".into()));
        }
        created
            .patch_spec(ctx, serde_json::json!({"saveAs": image.to_string()}))
            .await?;
        let done = created
            .follow(ctx, &format!("saving {image}:"), &|s| {
                s.status.as_ref().is_some_and(|st| st.phase == ShellSessionPhase::Saved)
            })
            .await?;
        Ok(done.status.and_then(|s| s.result).and_then(|r| r.digest))
    })
    .await;
    if outcome.is_err() {
        let _ = created
            .patch_spec(ctx, serde_json::json!({"discard": true}))
            .await;
    }
    created.delete(ctx).await;
    let digest = outcome?;
    println!(
        "Copied {} to {image}:{path} ({}).",
        local.display(),
        digest
            .as_deref()
            .map_or_else(|| "?".into(), crate::format::short_digest)
    );
    if !booted_by.is_empty() {
        println!(
            "{} node(s) reboot on the new version: {}.",
            booted_by.len(),
            booted_by.join(", ")
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_parse() {
        assert_eq!(
            parse_location("rpi:/etc/hostname").expect("valid"),
            Location::Image {
                image: image_name("rpi").expect("valid"),
                path: "/etc/hostname".into()
            }
        );
        assert_eq!(
            parse_location("./a:b").expect("valid"),
            Location::Local("./a:b".into())
        );
        assert_eq!(
            parse_location("file.txt").expect("valid"),
            Location::Local("file.txt".into())
        );
        assert!(
            parse_location("rpi:etc")
                .expect_err("relative")
                .to_string()
                .contains("absolute")
        );
        assert!(parse_location("Bad:/x").is_err());
    }

    #[test]
    fn scripts_never_echo_their_markers() {
        let out = export_script("/etc/os-release").expect("valid");
        assert!(!out.contains("__WALT_BEGIN__") && !out.contains("__WALT_END__"));
        assert!(out.contains("tar -c -C '/etc' 'os-release'"));
        let inn = import_script("conf d", "/boot/it's", Destination::NameOrDirectory);
        assert!(!inn.contains("__WALT_DONE__"));
        assert!(inn.contains("if [ -d '/boot/it'\\''s' ]; then mv \"$t\"/'conf d' '/boot/it'\\''s'/;"));
        let into = import_script("conf d", "/opt", Destination::IntoDirectory);
        assert!(
            into.contains("mkdir -p '/opt' && mv \"$t\"/'conf d' '/opt'/;"),
            "{into}"
        );
        assert!(export_script("/").is_err());
    }

    /// Runs the import script in `sh` (as the image's shell would) with `archive` on its input.
    fn run_import(archive: &[u8], base: &str, dest: &Path, destination: Destination) {
        use std::io::Write as _;
        let script = import_script(base, &dest.to_string_lossy(), destination);
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let payload = base64::engine::general_purpose::STANDARD.encode(archive);
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(payload.as_bytes())
            .expect("send the payload");
        let out = child.wait_with_output().expect("sh ran");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("__WALT_DONE__ 0"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    #[test]
    fn the_ready_marker_is_found_across_reads_and_never_in_the_typed_probe() {
        let mut out = b"$ echo __WALT_\"\"READY__\r\n__WALT_RE".to_vec();
        assert!(
            !newly_holds(&out, out.len(), READY_MARKER),
            "the probe's echo is not the answer"
        );
        out.extend_from_slice(b"ADY__\r\n$ ");
        assert!(newly_holds(&out, 9, READY_MARKER), "split over two reads");
        assert!(!newly_holds(b"READY", 5, READY_MARKER));
    }

    #[test]
    fn import_script_puts_files_where_cp_would() {
        let dir = tempfile::tempdir().expect("tmp");
        let tools = dir.path().join("tools");
        std::fs::create_dir_all(tools.join("bin")).expect("mkdir");
        std::fs::write(tools.join("bin/run"), b"#!/bin/sh\n").expect("write");
        let archive = pack_local(&tools, "tools").expect("pack");
        let image = dir.path().join("image");
        std::fs::create_dir_all(&image).expect("mkdir");
        // A trailing slash: into that directory, made when missing.
        run_import(&archive, "tools", &image.join("opt"), Destination::IntoDirectory);
        assert!(image.join("opt/tools/bin/run").is_file());
        // No slash, an existing directory: inside it.
        std::fs::create_dir_all(image.join("usr")).expect("mkdir");
        run_import(
            &archive,
            "tools",
            &image.join("usr"),
            Destination::NameOrDirectory,
        );
        assert!(image.join("usr/tools/bin/run").is_file());
        // No slash, a new path: that name.
        run_import(
            &archive,
            "tools",
            &image.join("srv"),
            Destination::NameOrDirectory,
        );
        assert!(image.join("srv/bin/run").is_file());
    }

    #[test]
    fn payload_roundtrip_through_tty_noise() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("hello.txt");
        std::fs::write(&src, b"hi there\n").expect("write");
        let archive = pack_local(&src, "hello.txt").expect("pack");
        let b64 = base64::engine::general_purpose::STANDARD.encode(&archive);
        let mut tty =
            String::from("# stty -echo; if [ -e ... printf '%s%s\\n' __WALT_ BEGIN__\r\n__WALT_BEGIN__\r\n");
        for chunk in b64.as_bytes().chunks(76) {
            tty.push_str(std::str::from_utf8(chunk).expect("ascii"));
            tty.push_str("\r\n");
        }
        tty.push_str("__WALT_END__\r\n");
        let data = extract_payload(&tty).expect("payload");
        assert_eq!(data, archive);
        let out = dir.path().join("copy.txt");
        unpack_local(&data, "hello.txt", &out).expect("unpack");
        assert_eq!(std::fs::read(&out).expect("read"), b"hi there\n");
        let into = dir.path().join("sub");
        std::fs::create_dir(&into).expect("mkdir");
        unpack_local(&data, "hello.txt", &into).expect("unpack");
        assert!(into.join("hello.txt").exists());
    }

    #[test]
    fn missing_files_are_reported() {
        let e = extract_payload("junk\r\n__WALT_MISSING__\r\n").expect_err("missing");
        assert!(e.to_string().contains("no such file"));
    }
}
