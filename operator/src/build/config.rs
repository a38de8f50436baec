//! The image config as a build changes it, and users from the image's `/etc/passwd`: pure functions.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::dockerfile::{CommandForm, Healthcheck};
use crate::runtime::root::Identity;

/// The `PATH` a step gets when the image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The image config document being built (the whole config blob: `architecture`, `config`, `rootfs`,
/// `history`, …; unknown fields kept).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageConfig {
    /// The document.
    pub doc: Value,
    /// Whether this stage set `CMD` (an `ENTRYPOINT` then keeps it; otherwise it resets an inherited one).
    pub cmd_set_here: bool,
}

impl ImageConfig {
    /// Wraps a base image's config.
    pub fn new(mut doc: Value) -> Self {
        if !doc.is_object() {
            doc = json!({});
        }
        if !doc["config"].is_object() {
            doc["config"] = json!({});
        }
        ImageConfig {
            doc,
            cmd_set_here: false,
        }
    }

    fn runtime(&mut self) -> &mut serde_json::Map<String, Value> {
        let slot = &mut self.doc["config"];
        if !slot.is_object() {
            *slot = Value::Object(serde_json::Map::new());
        }
        slot.as_object_mut().expect("config was just made an object")
    }

    /// `KEY=value` entries of `config.Env`.
    pub fn env(&self) -> Vec<(String, String)> {
        self.doc["config"]["Env"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|entry| match entry.split_once('=') {
                        Some((k, v)) => (k.to_owned(), v.to_owned()),
                        None => (entry.to_owned(), String::new()),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// One variable of `config.Env`.
    pub fn env_get(&self, name: &str) -> Option<String> {
        self.env().into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// Sets (or replaces, in place) a variable of `config.Env`.
    pub fn env_set(&mut self, name: &str, value: &str) {
        let mut env = self.env();
        match env.iter_mut().find(|(k, _)| k == name) {
            Some(entry) => value.clone_into(&mut entry.1),
            None => env.push((name.to_owned(), value.to_owned())),
        }
        let list: Vec<Value> = env.into_iter().map(|(k, v)| json!(format!("{k}={v}"))).collect();
        self.runtime().insert("Env".into(), Value::Array(list));
    }

    /// `config.WorkingDir` (`/` when unset).
    pub fn workdir(&self) -> String {
        self.doc["config"]["WorkingDir"]
            .as_str()
            .filter(|w| !w.is_empty())
            .unwrap_or("/")
            .to_owned()
    }

    /// Sets `config.WorkingDir`, resolving a relative path against the current one.
    pub fn set_workdir(&mut self, path: &str) -> String {
        let joined = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("{}/{path}", self.workdir().trim_end_matches('/'))
        };
        let cleaned = format!("/{}", super::context::clean(&joined).unwrap_or_default());
        self.runtime().insert("WorkingDir".into(), json!(cleaned));
        cleaned
    }

    /// `config.User` (empty: root).
    pub fn user(&self) -> String {
        self.doc["config"]["User"].as_str().unwrap_or_default().to_owned()
    }

    /// Sets a string field of `config` (`User`, `StopSignal`).
    pub fn set(&mut self, field: &str, value: Value) {
        self.runtime().insert(field.into(), value);
    }

    /// Adds `config.Labels` entries (the base's labels, `walt.node.models` among them, are kept).
    pub fn add_label(&mut self, key: &str, value: &str) {
        let runtime = self.runtime();
        let labels = runtime.entry("Labels").or_insert_with(|| json!({}));
        if !labels.is_object() {
            *labels = json!({});
        }
        labels[key] = json!(value);
    }

    /// Adds an entry to an object-valued field of `config` (`ExposedPorts`, `Volumes`).
    pub fn add_to_set(&mut self, field: &str, key: &str) {
        let runtime = self.runtime();
        let set = runtime.entry(field).or_insert_with(|| json!({}));
        if !set.is_object() {
            *set = json!({});
        }
        set[key] = json!({});
    }

    /// Sets `Cmd` (`entrypoint` false) or `Entrypoint` from a command in either form; an `ENTRYPOINT`
    /// resets a `CMD` inherited from the base image, as Docker does.
    pub fn set_command(&mut self, entrypoint: bool, command: &CommandForm, shell: &[String]) {
        let argv = argv_of(command, shell);
        if entrypoint {
            self.set("Entrypoint", json!(argv));
            if !self.cmd_set_here {
                self.runtime().remove("Cmd");
            }
        } else {
            self.set("Cmd", json!(argv));
            self.cmd_set_here = true;
        }
    }

    /// Sets `config.Healthcheck`.
    pub fn set_healthcheck(&mut self, check: &Healthcheck) {
        let value = match check {
            Healthcheck::None => json!({"Test": ["NONE"]}),
            Healthcheck::Check { command, options } => {
                let test = match command {
                    CommandForm::Exec(argv) => {
                        let mut test = vec!["CMD".to_owned()];
                        test.extend(argv.iter().cloned());
                        test
                    }
                    CommandForm::Shell(text) => vec!["CMD-SHELL".to_owned(), text.clone()],
                };
                let mut value = json!({ "Test": test });
                for (field, number) in options {
                    value[field] = json!(number);
                }
                value
            }
        };
        self.set("Healthcheck", value);
    }
}

/// The argv of a command: the exec form as is, the shell form through `shell` (`/bin/sh -c`).
pub fn argv_of(command: &CommandForm, shell: &[String]) -> Vec<String> {
    match command {
        CommandForm::Exec(argv) => argv.clone(),
        CommandForm::Shell(text) => {
            let mut argv = shell.to_vec();
            argv.push(text.clone());
            argv
        }
    }
}

/// Docker's default `SHELL`.
pub fn default_shell() -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into()]
}

/// `EXPOSE 80` → `80/tcp`.
pub fn port_key(word: &str) -> String {
    if word.contains('/') {
        word.to_ascii_lowercase()
    } else {
        format!("{word}/tcp")
    }
}

/// A user spec (`name`, `uid`, `name:group`, `uid:gid`) that cannot be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {name:?} is not in the image's {file}: create it in an earlier RUN (useradd/adduser), or give a number"
)]
pub struct UnknownUser {
    /// `user` or `group`.
    pub what: &'static str,
    /// The name.
    pub name: String,
    /// `/etc/passwd` or `/etc/group`.
    pub file: &'static str,
}

/// Resolves `spec` against the image's `/etc/passwd` and `/etc/group` text. With `primary_group`
/// (`USER`), a user without a group gets its primary group from passwd (0 when unknown) and its
/// supplementary groups; without it (`COPY --chown`), the gid is the uid, as Docker documents.
pub fn resolve_user(
    spec: &str,
    passwd: &str,
    group: &str,
    primary_group: bool,
) -> Result<(Identity, Option<String>), UnknownUser> {
    let (user, group_spec) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let passwd_entry = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && (fields[0] == user || fields[2] == user)).then(|| {
            (
                fields[0].to_owned(),
                fields[2].parse::<u32>().ok(),
                fields[3].parse::<u32>().ok(),
                fields[5].to_owned(),
            )
        })
    });
    let (name, uid, home) = match (&passwd_entry, user.parse::<u32>()) {
        (Some((name, Some(uid), _, home)), _) => (Some(name.clone()), *uid, Some(home.clone())),
        (_, Ok(uid)) => (None, uid, None),
        _ => {
            return Err(UnknownUser {
                what: "user",
                name: user.to_owned(),
                file: "/etc/passwd",
            });
        }
    };
    let group_id = |name: &str| -> Result<u32, UnknownUser> {
        if let Ok(gid) = name.parse::<u32>() {
            return Ok(gid);
        }
        group
            .lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                (fields.len() >= 3 && fields[0] == name).then(|| fields[2].parse::<u32>().ok())?
            })
            .ok_or_else(|| UnknownUser {
                what: "group",
                name: name.to_owned(),
                file: "/etc/group",
            })
    };
    let gid = match group_spec {
        Some(group_name) => group_id(group_name)?,
        None if primary_group => passwd_entry.as_ref().and_then(|e| e.2).unwrap_or(0),
        None => uid,
    };
    let mut groups = vec![gid];
    if primary_group
        && group_spec.is_none()
        && let Some(name) = &name
    {
        for line in group.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4
                && fields[3].split(',').any(|member| member == name)
                && let Ok(id) = fields[2].parse::<u32>()
                && !groups.contains(&id)
            {
                groups.push(id);
            }
        }
    }
    Ok((Identity { uid, gid, groups }, home))
}

/// The environment of a `RUN`: the image's `Env`, then the build args in scope that `Env` does not
/// set, a default `PATH`, and `HOME` from the user's passwd entry (else `/root`) when unset.
pub fn run_env(config: &ImageConfig, args: &BTreeMap<String, String>, home: Option<&str>) -> Vec<String> {
    let mut env = config.env();
    for (name, value) in args {
        if !env.iter().any(|(k, _)| k == name) {
            env.push((name.clone(), value.clone()));
        }
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), home.unwrap_or("/root").to_owned()));
    }
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwalt:x:1000:1001:WalT:/home/walt:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nlab:x:1001:\ndialout:x:20:walt,other\nvideo:x:44:walt\n";

    #[test]
    fn users_by_name_and_number() {
        let (id, home) = resolve_user("walt", PASSWD, GROUP, true).unwrap();
        assert_eq!(
            id,
            Identity {
                uid: 1000,
                gid: 1001,
                groups: vec![1001, 20, 44]
            }
        );
        assert_eq!(home.as_deref(), Some("/home/walt"));
        let (id, _) = resolve_user("walt:dialout", PASSWD, GROUP, true).unwrap();
        assert_eq!((id.uid, id.gid, id.groups), (1000, 20, vec![20]));
        let (id, home) = resolve_user("4242", PASSWD, GROUP, true).unwrap();
        assert_eq!((id.uid, id.gid), (4242, 0));
        assert_eq!(home, None);
        // COPY --chown=user: the gid is the uid.
        let (id, _) = resolve_user("walt", PASSWD, GROUP, false).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 1000));
        let (id, _) = resolve_user("1000:lab", PASSWD, GROUP, false).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 1001));
        let error = resolve_user("nobody", PASSWD, GROUP, true).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("\"nobody\" is not in the image's /etc/passwd"),
            "{error}"
        );
        let error = resolve_user("walt:staff", PASSWD, GROUP, false).unwrap_err();
        assert!(error.to_string().contains("group \"staff\""), "{error}");
    }

    #[test]
    fn config_edits_keep_the_base() {
        let mut config = ImageConfig::new(json!({
            "architecture": "arm64",
            "config": {"Env": ["PATH=/bin", "A=1"], "Labels": {"walt.node.models": "rpi-b"}, "Cmd": ["/bin/sh"]},
        }));
        config.env_set("A", "2");
        config.env_set("B", "x y");
        assert_eq!(config.doc["config"]["Env"], json!(["PATH=/bin", "A=2", "B=x y"]));
        assert_eq!(config.env_get("B").as_deref(), Some("x y"));
        config.add_label("version", "1");
        assert_eq!(config.doc["config"]["Labels"]["walt.node.models"], "rpi-b");
        assert_eq!(config.doc["config"]["Labels"]["version"], "1");
        assert_eq!(config.set_workdir("/opt"), "/opt");
        assert_eq!(config.set_workdir("app/../srv"), "/opt/srv");
        config.set_command(true, &CommandForm::Shell("run.sh".into()), &default_shell());
        assert_eq!(
            config.doc["config"]["Entrypoint"],
            json!(["/bin/sh", "-c", "run.sh"])
        );
        assert!(
            config.doc["config"].get("Cmd").is_none(),
            "an inherited CMD is reset by ENTRYPOINT"
        );
        config.set_command(
            false,
            &CommandForm::Exec(vec!["--serve".into()]),
            &default_shell(),
        );
        config.set_command(true, &CommandForm::Exec(vec!["/e".into()]), &default_shell());
        assert_eq!(
            config.doc["config"]["Cmd"],
            json!(["--serve"]),
            "a CMD of this stage stays"
        );
        config.add_to_set("ExposedPorts", &port_key("80"));
        assert_eq!(config.doc["config"]["ExposedPorts"], json!({"80/tcp": {}}));
        config.set_healthcheck(&Healthcheck::Check {
            command: CommandForm::Shell("check".into()),
            options: BTreeMap::from([("Retries".to_owned(), 3)]),
        });
        assert_eq!(
            config.doc["config"]["Healthcheck"],
            json!({"Test": ["CMD-SHELL", "check"], "Retries": 3})
        );
    }

    #[test]
    fn run_environment() {
        let config = ImageConfig::new(json!({"config": {"Env": ["A=from-env"]}}));
        let args = BTreeMap::from([
            ("A".to_owned(), "from-arg".to_owned()),
            ("V".to_owned(), "1".to_owned()),
        ]);
        assert_eq!(
            run_env(&config, &args, Some("/home/walt")),
            [
                "A=from-env",
                "V=1",
                &format!("PATH={DEFAULT_PATH}"),
                "HOME=/home/walt"
            ]
        );
    }
}
