//! Compiles the admin API's .proto files; the descriptor set feeds gRPC server reflection.

#[cfg(feature = "admin-api")]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure().file_descriptor_set_path(out_dir.join("qslice_admin_descriptor.bin")).compile_protos(&["proto/qslice/admin/v1/admin.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// Without the admin API (the fuzz targets' build) there is nothing to compile.
#[cfg(not(feature = "admin-api"))]
fn main() {}
