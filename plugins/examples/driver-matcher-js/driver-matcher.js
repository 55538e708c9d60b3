// The built-in driver matcher, rewritten in JavaScript: a profile applies when any of its
// match groups has all of its conditions true over the device's inventory.
//
// Built with componentize-js against `world driver-matcher` (see package.json); the
// `morgana:plugins/driver-matching` export is this module's `driverMatching` object.

import { log } from 'morgana:plugins/log@0.1.0';

// Case-insensitive glob: `*` matches any run of characters, everything else itself.
function globMatch(pattern, text) {
  const p = Array.from(pattern.toLowerCase());
  const t = Array.from(text.toLowerCase());
  let pi = 0, ti = 0, starP = -1, starT = 0;
  while (ti < t.length) {
    if (pi < p.length && p[pi] === '*') {
      starP = pi++;
      starT = ti;
    } else if (pi < p.length && p[pi] === t[ti]) {
      pi++;
      ti++;
    } else if (starP >= 0) {
      pi = starP + 1;
      ti = ++starT;
    } else {
      return false;
    }
  }
  while (pi < p.length && p[pi] === '*') pi++;
  return pi === p.length;
}

const hex4 = (n) => n.toString(16).padStart(4, '0');

function holds(cond, inventory, pciIds) {
  switch (cond.field) {
    case 'vendor': return globMatch(cond.pattern, inventory.vendor);
    case 'model': return globMatch(cond.pattern, inventory.model);
    case 'os': return globMatch(cond.pattern, inventory.os);
    case 'pci-id': return pciIds.some((id) => globMatch(cond.pattern, id));
    default: throw new Error(`unknown inventory field ${cond.field}`);
  }
}

export const driverMatching = {
  matchProfiles(inventory, profiles) {
    const pciIds = inventory.pciDevices.map((d) => `${hex4(d.vendorId)}:${hex4(d.deviceId)}`);
    const matches = [];
    for (const profile of profiles) {
      const group = profile.anyOf.find(
        (g) => g.all.length > 0 && g.all.every((c) => holds(c, inventory, pciIds)),
      );
      if (group) {
        const reason = group.all.map((c) => `${c.field} matches "${c.pattern}"`).join(' and ');
        matches.push({ profileId: profile.id, reason });
      }
    }
    log('debug', `${matches.length} of ${profiles.length} profiles apply`);
    return matches;
  },
};
