//! Turning the input paths of `prepare` into an ordered list of files.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One input file and its size in bytes.
pub(crate) struct InputFile {
    pub path: PathBuf,
    pub len: u64,
}

/// The files named by `inputs`, in order: a file as itself, a directory as the files under
/// it, walked recursively in sorted name order. Hidden entries (names starting with `.`)
/// inside a directory are skipped, and so is the directory `exclude` (the output directory,
/// which may sit inside an input directory).
pub(crate) fn collect(inputs: &[PathBuf], exclude: &Path) -> Result<Vec<InputFile>> {
    let exclude = fs::canonicalize(exclude).ok();
    let mut files = Vec::new();
    for input in inputs {
        let meta = fs::metadata(input).map_err(|e| Error::io(input, e))?;
        if meta.is_dir() {
            walk(input, exclude.as_deref(), &mut files)?;
        } else {
            files.push(InputFile { path: input.clone(), len: meta.len() });
        }
    }
    if files.is_empty() {
        return Err(Error::InvalidArgument(format!("no input files found in {inputs:?}")));
    }
    Ok(files)
}

fn walk(dir: &Path, exclude: Option<&Path>, files: &mut Vec<InputFile>) -> Result<()> {
    if exclude.is_some() && fs::canonicalize(dir).ok().as_deref() == exclude {
        return Ok(());
    }
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            entries.push(entry.path());
        }
    }
    entries.sort();
    for path in entries {
        // Follows symlinks, so a linked file or directory counts as what it points to.
        let meta = fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if meta.is_dir() {
            walk(&path, exclude, files)?;
        } else {
            files.push(InputFile { path, len: meta.len() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_are_walked_recursively_in_sorted_order_skipping_hidden_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for name in ["b.txt", "a/z.txt", "a/c/d.txt", ".hidden/x.txt", ".y.txt", "out/train.bin"] {
            let path = root.join(name);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, name).unwrap();
        }
        let extra = root.join("b.txt");
        let files = collect(&[root.to_path_buf(), extra], &root.join("out")).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.path.strip_prefix(root).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["a/c/d.txt", "a/z.txt", "b.txt", "b.txt"]);
        assert_eq!(files[0].len, "a/c/d.txt".len() as u64);
    }

    #[test]
    fn a_missing_input_is_an_error_naming_it() {
        let err = collect(&[PathBuf::from("/no/such/corpus")], Path::new("out")).err().unwrap();
        assert!(err.to_string().contains("/no/such/corpus"), "{err}");
    }

    #[test]
    fn an_empty_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(collect(&[dir.path().to_path_buf()], Path::new("out")).is_err());
    }
}
