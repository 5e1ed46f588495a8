//! A throwaway certificate authority for TLS tests, made with the openssl command:
//! a CA, a server certificate for 127.0.0.1/localhost, and a client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Certificate and key files in one directory.
pub struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().context("run openssl (install openssl)")?;
    if !out.status.success() {
        bail!("openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Pki {
    /// Generates a CA named `name` and a server and a client certificate it signs.
    pub fn generate(dir: &Path, name: &str) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let ca_subject = format!("/CN={name}");
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", &ca_subject, "-keyout", "ca.key", "-out", "ca.pem"];
        args.extend_from_slice(&ec);
        args.extend_from_slice(&["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(dir, &args)?;
        for (who, ext) in [
            ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"),
            ("client", "subjectAltName=DNS:qslice-client\nextendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"),
        ] {
            std::fs::write(dir.join(format!("{who}.ext")), ext)?;
            let subject = format!("/CN={who}");
            let (key, csr, pem, extfile) = (format!("{who}.key"), format!("{who}.csr"), format!("{who}.pem"), format!("{who}.ext"));
            let mut args = vec!["req", "-subj", &subject, "-keyout", &key, "-out", &csr];
            args.extend_from_slice(&ec);
            openssl(dir, &args)?;
            openssl(dir, &["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out", &pem, "-extfile", &extfile])?;
        }
        Ok(Pki { dir: dir.to_owned() })
    }

    /// A file of the set: `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }
}
