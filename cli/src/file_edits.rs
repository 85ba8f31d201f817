//! Notices edits of the demos' policies file.
//!
//! The content is compared, not the modification time: an edit made within one tick of the
//! filesystem's coarse clock, or before the watch started, keeps the old time and would
//! be missed. The file is a few kilobytes, so reading it every poll costs nothing.

use std::path::{Path, PathBuf};

pub struct FileEdits {
    path: PathBuf,
    last: Option<String>,
}

impl FileEdits {
    /// Starts from what the file holds now. Take it before telling the user to edit, so
    /// an edit that follows at once is not taken for the starting point.
    pub fn new(path: &Path) -> Self {
        FileEdits {
            path: path.to_path_buf(),
            last: std::fs::read_to_string(path).ok(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's text when it differs from the last text seen; a missing or unreadable
    /// file is no edit, so an editor's rename-and-replace does not show as an empty file.
    pub fn changed(&mut self) -> Option<String> {
        let now = std::fs::read_to_string(&self.path).ok()?;
        if self.last.as_deref() == Some(now.as_str()) {
            return None;
        }
        self.last = Some(now.clone());
        Some(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edit_right_after_the_start_is_seen_even_with_the_same_mtime() {
        let path = std::env::temp_dir().join(format!("palisade-edits-{}.yaml", std::process::id()));
        std::fs::write(&path, "a").unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let mut edits = FileEdits::new(&path);
        assert_eq!(edits.changed(), None);
        std::fs::write(&path, "b").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        assert_eq!(edits.changed().as_deref(), Some("b"));
        assert_eq!(edits.changed(), None);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(edits.changed(), None);
    }
}
