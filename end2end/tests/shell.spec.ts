import { expect, test } from "@playwright/test";
import { documentKept, expectHydrated, markDocument, navigate, phone } from "./hydration";

test.use({ viewport: phone });

test("the start page is server-rendered and hydrates", async ({ page }) => {
  await page.goto("/");
  await expect(page.getByRole("heading", { name: "Your credits, live" })).toBeVisible();
  await expectHydrated(page);
});

test("the start page says who is signed in, rendered on the server", async ({ page }) => {
  await page.goto("/");
  await expect(page.getByTestId("home-user")).toContainText("Sign in to see your balance");
  const response = await page.request.post("/api/dev/login", { data: { user_id: "home-user" } });
  expect(response.status()).toBe(200);
  await page.route("**/*.wasm", (route) => route.abort());
  await page.goto("/");
  await expect(page.getByTestId("home-user")).toHaveText(/^Signed in as home-user\./);
});

test("the page hydrates under its Content-Security-Policy, with no violation", async ({ page }) => {
  await page.addInitScript(() => {
    const seen: string[] = [];
    (window as unknown as { __cspViolations: string[] }).__cspViolations = seen;
    document.addEventListener("securitypolicyviolation", (e) =>
      seen.push(`${e.violatedDirective} ${e.blockedURI}`),
    );
  });
  const response = await page.goto("/");
  const policy = response?.headers()["content-security-policy"] ?? "";
  expect(policy).toContain("frame-ancestors 'none'");
  expect(policy).toMatch(/script-src [^;]*'nonce-[A-Za-z0-9_-]{16,}'/);
  expect(policy).not.toContain("unsafe-inline");
  expect(response?.headers()["x-content-type-options"]).toBe("nosniff");
  await expectHydrated(page);
  const violations = await page.evaluate(
    () => (window as unknown as { __cspViolations: string[] }).__cspViolations,
  );
  expect(violations).toEqual([]);
});

test("navigation to /debug and /login happens in the client", async ({ page }) => {
  await page.goto("/");
  await expectHydrated(page);
  await markDocument(page);

  await navigate(page, "Debug");
  await expect(page).toHaveURL(/\/debug$/);
  await expect(page.getByRole("heading", { name: "Debug", exact: true })).toBeVisible();
  expect(await documentKept(page)).toBe(true);

  await navigate(page, "Sign in");
  await expect(page).toHaveURL(/\/login$/);
  await expect(page.getByRole("heading", { name: "Sign in", exact: true })).toBeVisible();
  expect(await documentKept(page)).toBe(true);
});

test("control: with the wasm blocked the hydration check fails", async ({ page }) => {
  await page.route("**/*.wasm", (route) => route.abort());
  await page.goto("/");
  await expect(page.getByRole("heading", { name: "Your credits, live" })).toBeVisible();
  await expect(expectHydrated(page, 2_000)).rejects.toThrow();

  // Without the client router a link is a full page load, so the marked document is gone.
  await markDocument(page);
  await page.locator("#nav-links a[href='/debug']").evaluate((a) => (a as HTMLElement).click());
  await expect(page).toHaveURL(/\/debug$/);
  await expect(page.getByRole("heading", { name: "Debug", exact: true })).toBeVisible();
  expect(await documentKept(page)).toBe(false);
});

test("unknown pages answer 404 and unknown API paths answer ApiError JSON", async ({ request }) => {
  const page = await request.get("/no-such-page");
  expect(page.status()).toBe(404);
  const api = await request.get("/api/no-such-endpoint");
  expect(api.status()).toBe(404);
  expect(await api.json()).toEqual({ error: "not_found", message: expect.any(String) });
});
