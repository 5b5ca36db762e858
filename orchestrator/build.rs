fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/worker_manager.proto");
    tonic_prost_build::compile_protos("proto/worker_manager.proto")?;
    Ok(())
}
