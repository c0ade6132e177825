//! The lines the guest test prints on the serial console: one per check, then the verdict.
//!
//! ```text
//! CHECK <name>: PASS <what was seen>
//! CHECK <name>: FAIL <what was wrong>
//! CHECK <name>: SKIP <why it could not run here>
//! INFO  <anything worth knowing>
//! VMTEST: PASS (<n> checks passed, <k> skipped)  |  VMTEST: FAIL <names of the failed checks>
//! ```

use std::fmt::Display;

/// Collects check results and prints each as it comes.
#[derive(Debug, Default)]
pub struct Checks {
    failed: Vec<String>,
    passed: usize,
    skipped: usize,
}

impl Checks {
    /// No checks yet.
    pub fn new() -> Self {
        Checks::default()
    }

    /// Records and prints a passed check.
    pub fn pass(&mut self, name: &str, detail: impl Display) {
        self.passed += 1;
        println!("CHECK {name}: PASS {detail}");
    }

    /// Records and prints a failed check.
    pub fn fail(&mut self, name: &str, why: impl Display) {
        self.failed.push(name.to_owned());
        println!("CHECK {name}: FAIL {why}");
    }

    /// Records and prints a check that could not run here, with the reason.
    pub fn skip(&mut self, name: &str, why: impl Display) {
        self.skipped += 1;
        println!("CHECK {name}: SKIP {why}");
    }

    /// Records `Ok(detail)` as a pass and `Err(why)` as a failure.
    pub fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        match result {
            Ok(detail) => {
                self.pass(name, detail);
                true
            }
            Err(why) => {
                self.fail(name, why);
                false
            }
        }
    }

    /// Prints an information line.
    pub fn info(&self, msg: impl Display) {
        println!("INFO  {msg}");
    }

    /// Whether every check so far passed (or was skipped).
    pub fn all_passed(&self) -> bool {
        self.failed.is_empty()
    }

    /// The verdict line.
    ///
    /// ```
    /// let mut c = iovmap_vmtest::report::Checks::new();
    /// c.pass("a", "fine");
    /// assert_eq!(c.verdict(), "VMTEST: PASS (1 checks passed, 0 skipped)");
    /// c.fail("b", "broken");
    /// assert_eq!(c.verdict(), "VMTEST: FAIL 1 of 2 checks failed: b");
    /// ```
    pub fn verdict(&self) -> String {
        if self.failed.is_empty() {
            format!("VMTEST: PASS ({} checks passed, {} skipped)", self.passed, self.skipped)
        } else {
            format!(
                "VMTEST: FAIL {} of {} checks failed: {}",
                self.failed.len(),
                self.failed.len() + self.passed,
                self.failed.join(", ")
            )
        }
    }
}
