//! Compiles `protos/*.proto` into async ttrpc stubs with ttrpc-codegen (pure Rust, no protoc).

use std::{fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let protos = ["protos/health.proto", "protos/agent.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Codegen::new()
        .out_dir(&out)
        .inputs(protos)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc-codegen failed on protos/");

    // The generated files open with inner attributes (`#![allow(..)]`), which `include!` does
    // not accept; drop them and turn inner doc comments into plain ones (lib.rs sets the allows on the including module instead).
    for entry in fs::read_dir(&out).expect("read OUT_DIR") {
        let path = entry.expect("OUT_DIR entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).expect("read generated file");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("#!["))
                .map(|l| l.strip_prefix("//!").map_or(l, |_| "//"))
                .collect();
            fs::write(&path, kept.join("\n")).expect("write generated file");
        }
    }
}
