import { expect, type Page } from "@playwright/test";

/** A phone-sized viewport, where the navigation links fold behind the menu button. */
export const phone = { width: 390, height: 844 };

/**
 * Passes only once the page is live: the root carries the flag an effect sets in the
 * browser, and the menu button (a pure client-side toggle) answers a click. Needs the
 * `phone` viewport, where the button is shown.
 */
export async function expectHydrated(page: Page, timeout = 10_000): Promise<void> {
  await expect(page.locator(".app")).toHaveAttribute("data-hydrated", "true", { timeout });
  const toggle = page.getByRole("button", { name: "Menu" });
  await expect(async () => {
    const before = await toggle.getAttribute("aria-expanded");
    await toggle.click({ timeout: 1_000 });
    expect(await toggle.getAttribute("aria-expanded")).not.toBe(before);
  }).toPass({ timeout });
}

/** Opens the folded navigation menu and clicks the link named `name`. */
export async function navigate(page: Page, name: string): Promise<void> {
  const toggle = page.getByRole("button", { name: "Menu" });
  if ((await toggle.getAttribute("aria-expanded")) !== "true") {
    await toggle.click();
  }
  await page.locator("#nav-links").getByRole("link", { name }).click();
}

/** Marks the current document so a later check can tell a client-side navigation from a reload. */
export async function markDocument(page: Page): Promise<void> {
  await page.evaluate(() => {
    (window as unknown as { __livecreditsMark?: string }).__livecreditsMark = "kept";
  });
}

/** Whether the document marked by `markDocument` is still the one shown. */
export async function documentKept(page: Page): Promise<boolean> {
  return page.evaluate(
    () => (window as unknown as { __livecreditsMark?: string }).__livecreditsMark === "kept",
  );
}
