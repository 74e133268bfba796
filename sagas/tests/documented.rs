//! The codes a saga can end with or an input can be ignored for are the ones the docs explain:
//! a code added in the code and not in the docs (or renamed in one place only) fails here.

use std::path::PathBuf;

use sagas::{FailureCode, IgnoreReason, StopCode};

fn doc(path: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

#[test]
fn every_failure_code_of_the_orchestrator_is_in_the_concepts() {
    let concepts = doc("docs/concepts.md");
    let missing: Vec<&str> = FailureCode::OWN.iter().map(FailureCode::as_str).filter(|c| !concepts.contains(&format!("`{c}`"))).collect();
    assert!(missing.is_empty(), "docs/concepts.md does not name these failure codes: {missing:?}");
}

#[test]
fn every_stop_code_has_its_page_and_is_in_the_concepts() {
    let concepts = doc("docs/concepts.md");
    for code in StopCode::ALL.map(StopCode::as_str) {
        let page = doc(&format!("docs/errors/{code}.md"));
        assert!(page.starts_with(&format!("# `{code}`")), "docs/errors/{code}.md is about another code");
        assert!(concepts.contains(&format!("`{code}`")), "docs/concepts.md does not name the stop code {code}");
    }
}

#[test]
fn every_reason_an_input_is_ignored_for_is_explained_in_the_protocol() {
    let protocol = doc("docs/protocol.md");
    for reason in IgnoreReason::ALL.map(IgnoreReason::as_str) {
        assert!(protocol.contains(&format!("as `{reason}`")), "docs/protocol.md does not explain `{reason}`");
    }
}
