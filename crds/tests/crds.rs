//! The generated CRDs: drift against the committed YAML, shape (structural,
//! documented, bounded), and the example manifests against the schema and the
//! CEL rules (evaluated here with kube-cel; the real API server check lives in
//! the Kubernetes harness tests).

use std::{collections::BTreeSet, path::Path};

use serde_json::{Value, json};
use walt_crds::{
    ImageName,
    examples::{self, InvalidExample, RefusedBy},
};

const COMMITTED: [&str; 2] = ["charts/walt/crds/walt.dev.yaml", "deploy/crds/walt.dev.yaml"];

fn repo_root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

#[test]
fn committed_crd_yaml_matches_the_code() {
    let generated = walt_crds::crds_yaml();
    for relative in COMMITTED {
        let path = repo_root().join(relative);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "{relative} differs from what the code generates (or is missing).\n\
             Regenerate it from the repository root with:\n    \
             cargo run -p walt-operator -- crd > {relative}\n\
             (both {} must hold the same bytes)",
            COMMITTED.join(" and ")
        );
    }
}

/// The CRDs as JSON, by kind.
fn crds_by_kind() -> Vec<(String, Value)> {
    walt_crds::crds()
        .into_iter()
        .map(|crd| {
            (
                crd.spec.names.kind.clone(),
                serde_json::to_value(&crd).expect("CRD to JSON"),
            )
        })
        .collect()
}

fn schema_of(kind: &str) -> Value {
    let (_, crd) = crds_by_kind()
        .into_iter()
        .find(|(k, _)| k == kind)
        .expect("known kind");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn six_kinds_with_names_columns_and_status() {
    let expected = [
        (
            "Image",
            "images",
            vec!["wimg"],
            vec!["Reference", "Digest", "Arch", "Ready", "Age"],
        ),
        (
            "Node",
            "nodes",
            vec!["wnode", "wn"],
            vec!["Model", "Device", "Image", "Phase", "Address", "Age"],
        ),
        (
            "ShellSession",
            "shellsessions",
            vec!["wsh"],
            vec!["Image", "Node", "Phase", "Pod", "Age"],
        ),
        (
            "NodeSave",
            "nodesaves",
            vec!["wsave"],
            vec!["Node", "Image", "Phase", "Layer Size", "Duration", "Age"],
        ),
        (
            "ImageBuild",
            "imagebuilds",
            vec!["wbuild"],
            vec!["Image", "Phase", "Step", "Digest", "Age"],
        ),
        (
            "Device",
            "devices",
            vec!["wdev"],
            vec!["Model", "Address", "MAC", "Lent To", "Bound To", "Age"],
        ),
    ];
    let crds = crds_by_kind();
    assert_eq!(crds.len(), expected.len());
    for ((kind, crd), (want_kind, plural, short_names, columns)) in crds.iter().zip(expected) {
        assert_eq!(kind, want_kind);
        let spec = &crd["spec"];
        assert_eq!(crd["metadata"]["name"], format!("{plural}.walt.dev"));
        assert_eq!(spec["group"], "walt.dev");
        // Devices are the lab's (cluster-scoped, written by lab admins); the rest are tenants'.
        let scope = if kind == "Device" { "Cluster" } else { "Namespaced" };
        assert_eq!(spec["scope"], scope, "{kind}: scope");
        assert_eq!(spec["names"]["shortNames"], json!(short_names));
        assert_eq!(spec["names"]["categories"], json!(["walt"]));
        let version = &spec["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert_eq!(version["served"], true);
        assert_eq!(version["storage"], true);
        assert_eq!(
            version["subresources"],
            json!({"status": {}}),
            "{kind}: status subresource"
        );
        let names: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .expect("printer columns")
            .iter()
            .map(|column| column["name"].as_str().expect("column name"))
            .collect();
        assert_eq!(names, columns, "{kind}: printer columns");
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        if kind == "Device" {
            assert!(status["boundTo"].is_object(), "Device: status.boundTo");
            continue;
        }
        assert!(
            status["observedGeneration"].is_object(),
            "{kind}: status.observedGeneration"
        );
        let conditions = &status["conditions"];
        assert_eq!(
            conditions["x-kubernetes-list-type"], "map",
            "{kind}: conditions keyed by type"
        );
        for field in [
            "type",
            "status",
            "reason",
            "message",
            "lastTransitionTime",
            "observedGeneration",
        ] {
            assert!(
                conditions["items"]["properties"][field].is_object(),
                "{kind}: condition {field}"
            );
        }
    }
}

/// Visits every sub-schema with its JSON path.
fn walk<'a>(schema: &'a Value, path: &str, visit: &mut dyn FnMut(&str, &'a Value)) {
    visit(path, schema);
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            walk(property, &format!("{path}.{name}"), visit);
        }
    }
    if schema["items"].is_object() {
        walk(&schema["items"], &format!("{path}[]"), visit);
    }
    if schema["additionalProperties"].is_object() {
        walk(&schema["additionalProperties"], &format!("{path}{{}}"), visit);
    }
}

#[test]
fn schemas_are_structural_documented_and_bounded() {
    for (kind, _) in crds_by_kind() {
        let schema = schema_of(&kind);
        let mut problems = Vec::new();
        walk(&schema, &kind, &mut |path, node| {
            for forbidden in ["anyOf", "oneOf", "allOf", "not", "$ref", "definitions", "$defs"] {
                if node.get(forbidden).is_some() {
                    problems.push(format!("{path}: `{forbidden}` (not structural)"));
                }
            }
            let int_or_string = node["x-kubernetes-int-or-string"] == true;
            if node.get("type").is_none() && !int_or_string && path != kind {
                problems.push(format!("{path}: no type"));
            }
            if node.get("x-kubernetes-preserve-unknown-fields").is_some() {
                problems.push(format!("{path}: preserves unknown fields"));
            }
            if node["nullable"] == true && node.get("default").is_some() {
                problems.push(format!("{path}: nullable with a default"));
            }
            // Every field a user or client reads has a description (kubectl explain);
            // metadata's is Kubernetes' own.
            let top_level = [".metadata", ".apiVersion", ".kind"].map(|field| format!("{kind}{field}"));
            let is_meta = top_level.iter().any(|field| field == path);
            let scalar_item = path.ends_with("[]") && node["type"] != "object";
            if !is_meta
                && !scalar_item
                && path != kind
                && node["description"].as_str().is_none_or(str::is_empty)
            {
                problems.push(format!("{path}: no description"));
            }
            // Strings that CEL rules read are bounded, so the API server's cost estimate stays low.
            if node.get("x-kubernetes-validations").is_some()
                && node["type"] == "string"
                && node.get("maxLength").is_none()
            {
                problems.push(format!("{path}: CEL on a string without maxLength"));
            }
            if node["type"] == "array" && node.get("maxItems").is_none() {
                problems.push(format!("{path}: list without maxItems"));
            }
        });
        assert!(problems.is_empty(), "{kind}:\n{}", problems.join("\n"));
    }
}

#[test]
fn cel_rules_compile_and_stay_cheap() {
    for (kind, _) in crds_by_kind() {
        let schema = schema_of(&kind);
        let compiled = kube_cel::compile_schema(&schema);
        let errors: Vec<String> = compiled
            .compilation_errors()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            errors.is_empty(),
            "{kind}: CEL rules do not compile:\n{}",
            errors.join("\n")
        );
        let mut rules = 0;
        walk(&schema, &kind, &mut |path, node| {
            for rule in node["x-kubernetes-validations"].as_array().into_iter().flatten() {
                rules += 1;
                assert!(
                    rule["message"].as_str().is_some_and(|message| message.len() > 10),
                    "{path}: rule {rule} has no message a person understands"
                );
            }
        });
        assert!(rules > 0, "{kind}: no CEL rules");
    }
}

/// Reads a manifest as JSON.
fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|error| panic!("{}: not YAML: {error}", path.display()))
}

/// The OpenAPI schema of a kind, made strict the way `kubectl apply` (strict field
/// validation) is: unknown fields are errors rather than silently pruned.
fn strict(schema: &Value) -> Value {
    let mut schema = schema.clone();
    fn close(node: &mut Value) {
        if let Some(object) = node.as_object_mut() {
            if object.contains_key("properties") && !object.contains_key("additionalProperties") {
                object.insert("additionalProperties".into(), Value::Bool(false));
            }
            for child in object.values_mut() {
                close(child);
            }
        } else if let Some(array) = node.as_array_mut() {
            array.iter_mut().for_each(close);
        }
    }
    close(&mut schema);
    // metadata is only `type: object` in a CRD (the API server checks it itself);
    // apiVersion and kind are implied.
    schema["properties"]["metadata"] = json!({"type": "object"});
    schema["properties"]["apiVersion"] = json!({"type": "string"});
    schema["properties"]["kind"] = json!({"type": "string"});
    schema
}

/// The schema errors of a manifest (empty: valid).
fn schema_errors(kind: &str, manifest: &Value) -> Vec<String> {
    let validator =
        jsonschema::validator_for(&strict(&schema_of(kind))).expect("the CRD schema is a JSON schema");
    validator
        .iter_errors(manifest)
        .map(|error| format!("{}: {error}", error.instance_path()))
        .collect()
}

/// The CEL failures of a manifest (empty: valid), as the API server would report them.
fn cel_errors(kind: &str, manifest: &Value, old: Option<&Value>) -> Vec<String> {
    match kube_cel::Validator::new().validate(&schema_of(kind), manifest, old) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn kind_of(manifest: &Value, path: &Path) -> String {
    assert_eq!(
        manifest["apiVersion"],
        "walt.dev/v1alpha1",
        "{}: apiVersion",
        path.display()
    );
    manifest["kind"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: no kind", path.display()))
        .to_owned()
}

/// The manifest read back through the Rust types and written again, the way the
/// operator and the plugin write objects (defaults filled in).
fn through_types(kind: &str, manifest: &Value) -> Value {
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(manifest: &Value) -> Value {
        let typed: T = serde_json::from_value(manifest.clone()).expect("manifest reads as the Rust type");
        serde_json::to_value(typed).expect("typed object to JSON")
    }
    match kind {
        "Image" => round_trip::<walt_crds::Image>(manifest),
        "Node" => round_trip::<walt_crds::Node>(manifest),
        "ShellSession" => round_trip::<walt_crds::ShellSession>(manifest),
        "NodeSave" => round_trip::<walt_crds::NodeSave>(manifest),
        "ImageBuild" => round_trip::<walt_crds::ImageBuild>(manifest),
        "Device" => round_trip::<walt_crds::Device>(manifest),
        other => panic!("unknown kind {other}"),
    }
}

#[test]
fn every_valid_example_is_accepted() {
    let valid = examples::valid_examples().expect("list examples");
    let kinds: BTreeSet<String> = valid.iter().map(|path| kind_of(&load(path), path)).collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "Device",
            "Image",
            "ImageBuild",
            "Node",
            "NodeSave",
            "ShellSession"
        ]
    );
    assert!(
        valid.len() >= 6,
        "examples: a physical node, a virtual node, an image, a shell session, a node save, a build"
    );
    for path in valid {
        let manifest = load(&path);
        let kind = kind_of(&manifest, &path);
        let schema = schema_errors(&kind, &manifest);
        assert!(
            schema.is_empty(),
            "{}: refused by the schema:\n{}",
            path.display(),
            schema.join("\n")
        );
        let cel = cel_errors(&kind, &manifest, None);
        assert!(
            cel.is_empty(),
            "{}: refused by CEL rules:\n{}",
            path.display(),
            cel.join("\n")
        );
        // Updating an object to itself passes the transition rules.
        let cel = cel_errors(&kind, &manifest, Some(&manifest));
        assert!(
            cel.is_empty(),
            "{}: refused as a no-op update:\n{}",
            path.display(),
            cel.join("\n")
        );
        // What typed clients write is accepted too.
        let typed = through_types(&kind, &manifest);
        let errors = [schema_errors(&kind, &typed), cel_errors(&kind, &typed, None)].concat();
        assert!(
            errors.is_empty(),
            "{} written by the Rust types is refused:\n{}",
            path.display(),
            errors.join("\n")
        );
    }
}

#[test]
fn every_invalid_example_is_refused_with_its_message() {
    let invalid = examples::invalid_examples().expect("list invalid examples");
    assert!(invalid.len() >= 20, "only {} invalid examples", invalid.len());
    for InvalidExample {
        path,
        expect,
        refused_by,
        update_of,
    } in invalid
    {
        let manifest = load(&path);
        let kind = kind_of(&manifest, &path);
        let old = update_of.as_deref().map(load);
        if let Some(old) = &old {
            assert_eq!(kind_of(old, &path), kind);
            assert!(
                cel_errors(&kind, old, None).is_empty(),
                "{}: its update-of object must be valid",
                path.display()
            );
        }
        let schema = schema_errors(&kind, &manifest);
        let cel = cel_errors(&kind, &manifest, old.as_ref());
        match refused_by {
            RefusedBy::Cel => {
                assert!(
                    schema.is_empty(),
                    "{}: meant for a CEL rule, but the schema refuses it:\n{}",
                    path.display(),
                    schema.join("\n")
                );
                assert!(
                    cel.iter().any(|error| error.contains(&expect)),
                    "{}: expected a CEL failure containing {expect:?}, got: {cel:#?}",
                    path.display()
                );
            }
            RefusedBy::Schema => {
                assert!(!schema.is_empty(), "{}: the schema accepts it", path.display());
            }
        }
        if let Some(old) = &old {
            // The same object is valid on creation: only the transition refuses it.
            assert!(
                cel_errors(&kind, &manifest, None).is_empty(),
                "{}: refused even on creation",
                path.display()
            );
            assert!(cel_errors(&kind, old, Some(old)).is_empty());
        }
    }
}

#[test]
fn image_name_helper_agrees_with_the_cel_rules() {
    let schema = schema_of("NodeSave");
    let names = [
        "rpi",
        "rpi-debian",
        "rpi:v2",
        "0",
        "a-b-c:1-2",
        "default-x",
        "x:default",
        "default",
        "default:v2",
        "",
        "Rpi",
        "rpi_x",
        "rpi:",
        ":v2",
        "-rpi",
        "rpi-",
        "rpi:-v2",
        "rpi.v2",
        "rpi:v2:v3",
        "rpi debian",
        "rpi:1.2",
    ];
    let long = "a".repeat(129);
    for name in names.iter().copied().chain([long.as_str()]) {
        let manifest = json!({
            "apiVersion": "walt.dev/v1alpha1", "kind": "NodeSave", "metadata": {"name": "save"},
            "spec": {"node": "rpi-01", "image": name},
        });
        let server_accepts = schema_errors("NodeSave", &manifest).is_empty()
            && kube_cel::Validator::new()
                .validate(&schema, &manifest, None)
                .is_ok();
        assert_eq!(
            ImageName::parse(name).is_ok(),
            server_accepts,
            "image name {name:?}"
        );
    }
}
